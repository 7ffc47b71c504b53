"""POST /v1/completions (legacy, plain prompt, no chat template): the same pipeline as chat.py, with
`text_completion` objects, the legacy logprobs format, and a list of prompts served as one response."""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from plm_serve.engine import EngineClient, EngineRequest, FinishReason, StepOutput, TokenLogprob
from plm_serve.processors import ProcessedPrompt
from plm_serve.server import sse
from plm_serve.server.deps import ServerContext
from plm_serve.server.errors import bad_request
from plm_serve.server.limits import check_caps, request_cache_salt, with_output_budget
from plm_serve.server.logprobs import completion_logprobs, echo_logprobs, prompt_logprobs_out
from plm_serve.server.metrics import RequestRecorder
from plm_serve.server.protocol import (
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
)
from plm_serve.server.request_common import SYSTEM_FINGERPRINT, constrain, engine_request, max_prompt_tokens
from plm_serve.server.runner import (
    UsageCounter,
    cancel_on_disconnect,
    error_body,
    failure_of,
    merge,
    open_all,
)
from plm_serve.server.sse import SSEResponse
from plm_serve.server.structured import structured_output_of


async def create_completion(
    body: CompletionRequest, http: Request, ctx: ServerContext, engine: EngineClient
) -> Response:
    body.check_supported()
    if body.stream and body.prompt_logprobs is not None:
        raise bad_request("prompt_logprobs are not available when stream is true", param="prompt_logprobs")
    arrival = time.monotonic()
    meta = CompletionMeta(
        id=f"cmpl-{uuid.uuid4().hex}", model=ctx.model_name, include_usage=body.include_usage
    )
    n = body.num_choices
    usage = UsageCounter(report_cached=ctx.config.report_cached_tokens)
    salt = request_cache_salt(body.cache_salt, http.headers.get("authorization"), ctx.config)
    echoes: list[PromptEcho] = []

    async def start() -> AsyncGenerator[StepOutput, None]:
        requests = await build_requests(body, ctx, engine, meta.id, arrival, cache_salt=salt)
        usage.prompt_tokens = sum(len(r.prompt_token_ids) for r in requests)
        echoes.extend(_echoes(body, requests, ctx) if body.echo else [])
        recorders = [RequestRecorder(ctx.metrics, arrival) for _ in requests]
        return merge(await open_all(engine, requests, recorders), n)

    view = OutputView(n, body.scores_only, body.logprobs, body.prompt_logprobs, echoes)
    if body.stream:
        outputs = await cancel_on_disconnect(http, start())
        return SSEResponse(stream_chunks(outputs, meta, view, usage))

    async def run() -> CompletionResponse:
        return await collect(await start(), meta, view, len(body.prompts()), usage)

    response = await cancel_on_disconnect(http, run())
    return JSONResponse(response.model_dump(mode="json"))


async def build_requests(
    body: CompletionRequest,
    ctx: ServerContext,
    engine: EngineClient,
    request_id: str,
    arrival: float,
    cache_salt: str | None = None,
) -> list[EngineRequest]:
    assert ctx.processor is not None
    vocab_size = ctx.processor.tokenizer.get_vocab_size()
    params = body.to_sampling_params(vocab_size)
    structured = structured_output_of(body)
    grammar, param = structured if structured is not None else (None, None)
    # echo + logprobs scores the prompt (k alternatives each); vLLM's prompt_logprobs asks the same.
    wanted = [k for k in (body.prompt_logprobs, body.logprobs if body.echo else None) if k is not None]
    params = await constrain(params, engine, grammar, param, max(wanted) if wanted else None)
    prompts = body.prompts()
    check_caps(params, ctx.config, num_prompts=len(prompts), logprobs_param="logprobs")
    limit = max_prompt_tokens(params, engine.max_model_len)
    placeholders = {ctx.processor.image_token_id, ctx.processor.video_token_id}
    loop = asyncio.get_running_loop()
    processed: list[ProcessedPrompt] = []
    for i, prompt in enumerate(prompts):
        param = "prompt" if len(prompts) == 1 else f"prompt[{i}]"
        if isinstance(prompt, str):
            process = functools.partial(ctx.processor.process_prompt, prompt, max_prompt_tokens=limit)
            processed.append(await loop.run_in_executor(ctx.executor, process))
        else:
            processed.append(_token_prompt(prompt, vocab_size, limit, param, placeholders))
    # One engine request per prompt; the response id stays shared (engine ids must be unique).
    ids = [request_id] if len(prompts) == 1 else [f"{request_id}-{i}" for i in range(len(prompts))]
    max_len = engine.max_model_len
    return [
        engine_request(
            rid, p, with_output_budget(params, len(p.token_ids), max_len, ctx.config), arrival, cache_salt
        )
        for rid, p in zip(ids, processed, strict=True)
    ]


def _token_prompt(
    token_ids: list[int], vocab_size: int, limit: int, param: str, placeholders: set[int]
) -> ProcessedPrompt:
    if not token_ids:
        raise bad_request("a prompt of token ids must not be empty", param=param)
    if any(not 0 <= t < vocab_size for t in token_ids):
        raise bad_request(f"prompt token ids must be in [0, {vocab_size})", param=param)
    if not placeholders.isdisjoint(token_ids):
        raise bad_request(
            f"prompt token ids may not contain the media placeholder ids {sorted(placeholders)}: a completions "
            "prompt has no media to put there; use /v1/chat/completions with image_url or video_url parts",
            param=param,
        )
    if len(token_ids) > limit:
        raise bad_request(
            f"the prompt has {len(token_ids)} tokens; with max_tokens the limit is {limit}",
            param=param,
            code="prompt_too_long_error",
        )
    return ProcessedPrompt(token_ids=list(token_ids), media=[])


# ----------------------------------------------------------------------------------------------------- echo
@dataclass
class PromptEcho:
    """What `echo` puts in front of each choice of one prompt: its text, and its scores once choice 0 has them."""

    text: str
    first_token: str  # the text of the prompt's first token (which has no logprob)
    scores: list[TokenLogprob | None] | None = None


def _echoes(body: CompletionRequest, requests: list[EngineRequest], ctx: ServerContext) -> list[PromptEcho]:
    """The original string of a text prompt (as OpenAI echoes it), the decoded ids of a token prompt."""
    assert ctx.processor is not None
    decode = ctx.processor.tokenizer.decode
    return [
        PromptEcho(
            prompt if isinstance(prompt, str) else decode(prompt, skip_special_tokens=False),
            decode(request.prompt_token_ids[:1], skip_special_tokens=False),
        )
        for prompt, request in zip(body.prompts(), requests, strict=True)
    ]


@dataclass
class OutputView:
    """How a choice's outputs are shown: echo in front, scores, and (max_tokens 0) nothing generated."""

    n: int
    scores_only: bool
    num_logprobs: int | None
    num_prompt_logprobs: int | None
    echoes: list[PromptEcho]

    def prepare(self, out: StepOutput) -> StepOutput:
        """Record the prompt's scores; with max_tokens 0, drop the one token the engine had to generate."""
        if out.prompt_logprobs is not None and self.echoes:
            self.echoes[out.index // self.n].scores = out.prompt_logprobs
        if self.scores_only:
            out = dataclasses.replace(
                out, text="", token_ids=[], logprobs=None, num_output_tokens=0,
                finish_reason=FinishReason.LENGTH if out.finished else None,
            )  # fmt: skip
        return out

    def echo(self, index: int) -> tuple[str, CompletionLogprobs | None]:
        """The echoed prompt of choice `index`, with its logprobs when asked."""
        if not self.echoes:
            return "", None
        echo = self.echoes[index // self.n]
        logprobs = None
        if self.num_logprobs is not None and echo.scores is not None:
            logprobs = echo_logprobs(echo.first_token, echo.scores, self.num_logprobs)
        return echo.text, logprobs


@dataclass
class CompletionMeta:
    id: str
    model: str
    include_usage: bool = False
    created: int = field(default_factory=lambda: int(time.time()))

    def chunk(self, choices: list[CompletionChoice], **extra: Any) -> CompletionResponse:
        if self.include_usage:
            extra.setdefault("usage", None)
        return CompletionResponse(
            id=self.id,
            object="text_completion",
            created=self.created,
            model=self.model,
            system_fingerprint=SYSTEM_FINGERPRINT,
            choices=choices,
            **extra,
        )


async def stream_chunks(
    outputs: AsyncGenerator[StepOutput, None], meta: CompletionMeta, view: OutputView, usage: UsageCounter
) -> AsyncIterator[str]:
    n = view.n
    offsets: dict[int, int] = {}  # per choice: characters streamed so far (legacy logprobs' text_offset)
    try:
        async with aclosing(outputs):  # closed on every exit: what is still running gets aborted
            async for raw in outputs:
                out = view.prepare(raw)
                usage.observe(out, out.index // n)
                failure = failure_of(out)
                if failure is not None:
                    yield sse.error_event(failure.body())
                    break
                if out.index not in offsets and view.echoes:  # the choice's first chunk: the prompt
                    text, logprobs = view.echo(out.index)
                    offsets[out.index] = len(text)
                    yield sse.event(meta.chunk([_choice(out.index, text, logprobs)]))
                offset = offsets.get(out.index, 0)
                offsets[out.index] = offset + len(out.text)
                if out.text or out.logprobs:
                    logprobs = completion_logprobs(out.logprobs, offset) if out.logprobs else None
                    yield sse.event(meta.chunk([_choice(out.index, out.text, logprobs)]))
                if out.finish_reason is not None:
                    yield sse.event(meta.chunk([_choice(out.index, "", None, out.finish_reason.value)]))
            else:
                if meta.include_usage:
                    yield sse.event(meta.chunk([], usage=usage.usage()))
    except Exception as exc:
        yield sse.error_event(error_body(exc))
    yield sse.DONE


def _choice(index: int, text: str, logprobs: CompletionLogprobs | None, finish: str | None = None):
    return CompletionChoice(text=text, index=index, logprobs=logprobs, finish_reason=finish)


async def collect(
    outputs: AsyncGenerator[StepOutput, None],
    meta: CompletionMeta,
    view: OutputView,
    num_prompts: int,
    usage: UsageCounter,
) -> CompletionResponse:
    n = view.n
    total = n * num_prompts
    texts: list[list[str]] = [[] for _ in range(total)]
    logprobs: list[CompletionLogprobs | None] = [None] * total
    finish: list[str | None] = [None] * total
    prompt_scores: list[list[TokenLogprob | None] | None] = [None] * num_prompts
    async with aclosing(outputs):
        async for raw in outputs:
            out = view.prepare(raw)
            usage.observe(out, out.index // n)
            failure = failure_of(out)
            if failure is not None:
                raise failure
            if out.prompt_logprobs is not None:
                prompt_scores[out.index // n] = out.prompt_logprobs
            if out.logprobs is not None:
                part = completion_logprobs(out.logprobs, sum(map(len, texts[out.index])))
                logprobs[out.index] = _extend(logprobs[out.index], part)
            texts[out.index].append(out.text)
            if out.finish_reason is not None:
                finish[out.index] = out.finish_reason.value
    choices = []
    for i in range(total):
        text, echoed = view.echo(i)
        if echoed is not None:  # the prompt's scores, then the completion's, offsets after the prompt
            shifted = logprobs[i] or CompletionLogprobs()
            shifted.text_offset = [o + len(text) for o in shifted.text_offset]
            logprobs[i] = _extend(echoed, shifted)
        elif view.num_logprobs is not None and logprobs[i] is None:
            logprobs[i] = CompletionLogprobs()  # asked for, nothing generated (max_tokens 0 without scores)
        scores = prompt_scores[i // n]
        choices.append(
            CompletionChoice(
                text=text + "".join(texts[i]),
                index=i,
                logprobs=logprobs[i],
                finish_reason=finish[i],
                prompt_logprobs=prompt_logprobs_out(scores, view.num_prompt_logprobs)
                if scores is not None and view.num_prompt_logprobs is not None
                else None,
            )
        )
    return meta.chunk(choices, usage=usage.usage())  # the full response has the chunk's shape


def _extend(acc: CompletionLogprobs | None, part: CompletionLogprobs) -> CompletionLogprobs:
    if acc is None:
        return part
    acc.text_offset += part.text_offset
    acc.token_logprobs += part.token_logprobs
    acc.tokens += part.tokens
    acc.top_logprobs += part.top_logprobs
    return acc
