"""POST /v1/chat/completions: request -> processors -> EngineRequest -> StepOutputs -> chunks or one response.

1. `build_request`: fetch media (concurrently), tokenize and tile in the worker pool, reject over-long prompts
   before the engine sees them.
2. `runner.open_generation`: submit and wait for the first output (errors are still HTTP statuses here).
3. `stream_chunks` (SSE) or `collect` (one JSON body), both a straight walk over the StepOutputs.
"""

from __future__ import annotations

import asyncio
import functools
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Iterator
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from plm_serve.engine import AsyncEngine, EngineRequest, MMInput, SamplingParams, StepOutput
from plm_serve.processors import ImageInput, ProcessedPrompt, VideoInput
from plm_serve.server import sse
from plm_serve.server.deps import ServerContext
from plm_serve.server.errors import APIError, bad_request
from plm_serve.server.limits import check_caps, request_cache_salt, with_output_budget
from plm_serve.server.logprobs import TokenBytes, chat_logprobs
from plm_serve.server.metrics import RequestRecorder
from plm_serve.server.protocol import (
    AssistantMessage,
    ChatChunkChoice,
    ChatCompletionChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatMessage,
    ChoiceLogprobs,
    Delta,
    ImageURLPart,
    TextPart,
    VideoURLPart,
)
from plm_serve.server.runner import (
    UsageCounter,
    cancel_on_disconnect,
    error_body,
    failure_of,
    open_generation,
)
from plm_serve.server.sse import SSEResponse

SYSTEM_FINGERPRINT = "plm-serve"


async def create_chat_completion(
    body: ChatCompletionRequest, http: Request, ctx: ServerContext, engine: AsyncEngine
) -> Response:
    body.check_supported()
    arrival = time.monotonic()
    meta = ChatMeta(id=f"chatcmpl-{uuid.uuid4().hex}", model=ctx.model_name, include_usage=body.include_usage)
    recorder = RequestRecorder(ctx.metrics, arrival)
    usage = UsageCounter(report_cached=ctx.config.report_cached_tokens)
    salt = request_cache_salt(body.cache_salt, http.headers.get("authorization"), ctx.config)

    async def start() -> AsyncGenerator[StepOutput, None]:
        request = await build_request(body, ctx, engine, meta.id, arrival, cache_salt=salt)
        usage.prompt_tokens = len(request.prompt_token_ids)
        return await open_generation(engine, request, recorder)

    assert ctx.token_bytes is not None
    n, token_bytes = body.num_choices, ctx.token_bytes
    if body.stream:
        outputs = await cancel_on_disconnect(http, start())
        return SSEResponse(stream_chunks(outputs, meta, n, usage, token_bytes))

    async def run() -> ChatCompletionResponse:
        return await collect(await start(), meta, n, usage, token_bytes)

    response = await cancel_on_disconnect(http, run())
    return JSONResponse(response.model_dump(mode="json"))


# ----------------------------------------------------------------------------------------- request building
async def build_request(
    body: ChatCompletionRequest,
    ctx: ServerContext,
    engine: AsyncEngine,
    request_id: str,
    arrival: float,
    cache_salt: str | None = None,
) -> EngineRequest:
    assert ctx.processor is not None
    params = body.to_sampling_params(ctx.processor.tokenizer.get_vocab_size())
    check_caps(params, ctx.config)
    limit = max_prompt_tokens(params, engine.max_model_len)
    messages = await load_messages(body.messages, ctx)
    process = functools.partial(ctx.processor.process_chat, messages, max_prompt_tokens=limit)
    prompt = await asyncio.get_running_loop().run_in_executor(ctx.executor, process)
    params = with_output_budget(params, len(prompt.token_ids), engine.max_model_len, ctx.config)
    return engine_request(request_id, prompt, params, arrival, cache_salt)


def max_prompt_tokens(params: SamplingParams, max_model_len: int) -> int:
    """The prompt may use what `max_tokens` leaves of the context (at least one token must fit)."""
    if params.max_tokens is not None and params.max_tokens >= max_model_len:
        raise bad_request(
            f"max_tokens={params.max_tokens} leaves no room for the prompt: "
            f"the context length is {max_model_len}",
            param="max_tokens",
        )
    return max_model_len - (params.max_tokens or 1)


def engine_request(
    request_id: str,
    prompt: ProcessedPrompt,
    params: SamplingParams,
    arrival: float,
    cache_salt: str | None = None,
) -> EngineRequest:
    media = [MMInput(m.content_hash, m.pixels, m.offset, m.length, m.kind) for m in prompt.media]
    return EngineRequest(
        request_id, list(prompt.token_ids), params, media, arrival_time=arrival, cache_salt=cache_salt
    )


async def load_messages(messages: list[ChatMessage], ctx: ServerContext) -> list[dict[str, Any]]:
    """Protocol messages -> the processor's input, with every media URL fetched into bytes (all at once).

    Messages keep their positions, so a processor error's `param` ("messages[1].content[0]") points into the
    request.
    """
    cfg = ctx.config
    num_media = sum(
        isinstance(p, ImageURLPart | VideoURLPart)
        for m in messages
        if isinstance(m.content, list)
        for p in m.content
    )
    if num_media > cfg.max_media_per_request:
        raise APIError(
            413,
            f"{num_media} images/videos in one request; the limit is {cfg.max_media_per_request}",
            param="messages",
            code="media_too_large",
        )
    converted: list[dict[str, Any]] = []
    pending: list[
        tuple[list[Any], int, asyncio.Future]
    ] = []  # (parts list, position, fetch producing the part)
    for mi, message in enumerate(messages):
        role = message.role  # the processor maps "developer" to "system" and validates the structure
        if not isinstance(message.content, list):
            converted.append({"role": role, "content": message.content})
            continue
        parts: list[Any] = []
        for pi, part in enumerate(message.content):
            param = f"messages[{mi}].content[{pi}]"
            if isinstance(part, TextPart):
                parts.append({"type": "text", "text": part.text})
            else:
                parts.append(None)
                pending.append((parts, pi, asyncio.ensure_future(_load_part(part, ctx, param))))
        converted.append({"role": role, "content": parts})
    fetches = [fetch for _, _, fetch in pending]
    try:
        loaded = await asyncio.gather(*fetches)
    except BaseException:
        for fetch in fetches:
            fetch.cancel()  # one bad URL fails the request: stop downloading the others
        raise
    for (parts, pi, _), value in zip(pending, loaded, strict=True):
        parts[pi] = value
    return converted


async def _load_part(
    part: ImageURLPart | VideoURLPart, ctx: ServerContext, param: str
) -> ImageInput | VideoInput:
    cfg = ctx.config
    if isinstance(part, ImageURLPart):
        img = part.image_url
        data = await ctx.fetcher.fetch(img.url, max_bytes=cfg.max_image_bytes, param=f"{param}.image_url.url")
        return ImageInput(data=data, detail=img.detail, max_num_tiles=img.max_num_tiles)
    video = part.video_url
    data = await ctx.fetcher.fetch(video.url, max_bytes=cfg.max_video_bytes, param=f"{param}.video_url.url")
    return VideoInput(data=data, num_frames=video.num_frames, fps=video.fps)


# ------------------------------------------------------------------------------------------------ responses
@dataclass
class ChatMeta:
    """What every chunk of one response repeats."""

    id: str
    model: str
    include_usage: bool = False
    created: int = field(default_factory=lambda: int(time.time()))

    def chunk(self, choices: list[ChatChunkChoice], **extra: Any) -> ChatCompletionChunk:
        if self.include_usage:
            extra.setdefault("usage", None)  # OpenAI sends "usage": null on every chunk but the last
        return ChatCompletionChunk(
            id=self.id,
            object="chat.completion.chunk",
            created=self.created,
            model=self.model,
            system_fingerprint=SYSTEM_FINGERPRINT,
            choices=choices,
            **extra,
        )


def _choice(index: int, delta: Delta, logprobs: ChoiceLogprobs | None = None, finish: str | None = None):
    return ChatChunkChoice(index=index, delta=delta, logprobs=logprobs, finish_reason=finish)


async def stream_chunks(
    outputs: AsyncGenerator[StepOutput, None],
    meta: ChatMeta,
    n: int,
    usage: UsageCounter,
    token_bytes: TokenBytes,
) -> AsyncIterator[str]:
    """Role chunk per choice, content deltas, a finish chunk per choice, the usage chunk if asked, [DONE]."""
    try:
        for i in range(n):
            yield sse.event(meta.chunk([_choice(i, Delta(role="assistant", content=""))]))
        async with aclosing(outputs):  # closed on every exit: what is still running gets aborted
            async for out in outputs:
                usage.observe(out)
                failure = failure_of(out)
                if failure is not None:
                    yield sse.error_event(failure.body())
                    break
                for event in _events(out, meta, token_bytes):
                    yield event
            else:
                if meta.include_usage:
                    yield sse.event(meta.chunk([], usage=usage.usage()))
    except Exception as exc:  # the engine died mid-stream: the status line is sent, so report it in-band
        yield sse.error_event(error_body(exc))
    yield sse.DONE


def _events(out: StepOutput, meta: ChatMeta, token_bytes: TokenBytes) -> Iterator[str]:
    """One StepOutput as SSE events: its content delta (with logprobs), then its finish chunk if it has one."""
    if out.text or out.logprobs:
        logprobs = ChoiceLogprobs(content=chat_logprobs(out.logprobs, token_bytes)) if out.logprobs else None
        yield sse.event(meta.chunk([_choice(out.index, Delta(content=out.text), logprobs)]))
    if out.finish_reason is not None:
        yield sse.event(meta.chunk([_choice(out.index, Delta(), finish=out.finish_reason.value)]))


async def collect(
    outputs: AsyncGenerator[StepOutput, None],
    meta: ChatMeta,
    n: int,
    usage: UsageCounter,
    token_bytes: TokenBytes,
) -> ChatCompletionResponse:
    texts: list[list[str]] = [[] for _ in range(n)]
    logprobs: list[list[Any] | None] = [None] * n
    finish: list[str | None] = [None] * n
    async with aclosing(outputs):
        async for out in outputs:
            usage.observe(out)
            failure = failure_of(out)
            if failure is not None:
                raise failure
            texts[out.index].append(out.text)
            if out.logprobs is not None:
                logprobs[out.index] = (logprobs[out.index] or []) + chat_logprobs(out.logprobs, token_bytes)
            if out.finish_reason is not None:
                finish[out.index] = out.finish_reason.value
    choices = [
        ChatCompletionChoice(
            index=i,
            message=AssistantMessage(content="".join(texts[i])),
            logprobs=ChoiceLogprobs(content=logprobs[i]) if logprobs[i] is not None else None,
            finish_reason=finish[i],
        )
        for i in range(n)
    ]
    return ChatCompletionResponse(
        id=meta.id,
        created=meta.created,
        model=meta.model,
        choices=choices,
        usage=usage.usage(),
        system_fingerprint=SYSTEM_FINGERPRINT,
    )
