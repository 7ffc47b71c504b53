"""POST /v1/chat/completions: request -> processors -> EngineRequest -> StepOutputs -> chunks or one response.

1. `build_request`: plan tools and the output constraint (compiled now: a bad schema is a 400), fetch media
   (concurrently), tokenize and tile in the worker pool, reject over-long prompts before the engine sees them.
2. `runner.open_generation`: submit and wait for the first output (errors are still HTTP statuses here).
3. `stream_chunks` (SSE) or `collect` (one JSON body), both a straight walk over the StepOutputs; with tools,
   each choice's text goes through a ToolCallParser (tool_parser.py) into content and tool-call deltas.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Iterator
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from plm_serve.engine import EngineClient, EngineRequest, StepOutput
from plm_serve.processors import TokenBytes
from plm_serve.server import sse
from plm_serve.server.deps import ServerContext
from plm_serve.server.errors import bad_request
from plm_serve.server.limits import check_caps, request_cache_salt
from plm_serve.server.logprobs import chat_logprobs, prompt_logprobs_out
from plm_serve.server.metrics import RequestRecorder
from plm_serve.server.protocol import (
    AssistantMessage,
    ChatChunkChoice,
    ChatCompletionChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChoiceLogprobs,
    Delta,
)
from plm_serve.server.protocol_tools import FunctionCallDelta, FunctionCallOut, ToolCallDelta, ToolCallOut
from plm_serve.server.request_common import SYSTEM_FINGERPRINT, chat_engine_request, constrain
from plm_serve.server.runner import (
    UsageCounter,
    cancel_on_disconnect,
    error_body,
    failure_of,
    open_generation,
)
from plm_serve.server.sse import SSEResponse
from plm_serve.server.structured import structured_output_of
from plm_serve.server.tool_parser import ToolCallParser, ToolEvent
from plm_serve.server.tools import ToolPlan, chat_tool_plan


async def create_chat_completion(
    body: ChatCompletionRequest, http: Request, ctx: ServerContext, engine: EngineClient
) -> Response:
    body.check_supported()
    if body.stream and body.prompt_logprobs is not None:
        raise bad_request("prompt_logprobs are not available when stream is true", param="prompt_logprobs")
    plan = chat_tool_plan(body.tools, body.tool_choice, body.parallel_tool_calls)
    arrival = time.monotonic()
    meta = ChatMeta(id=f"chatcmpl-{uuid.uuid4().hex}", model=ctx.model_name, include_usage=body.include_usage)
    recorder = RequestRecorder(ctx.metrics, arrival)
    usage = UsageCounter(report_cached=ctx.config.report_cached_tokens)
    salt = request_cache_salt(body.cache_salt, http.headers.get("authorization"), ctx.config)

    async def start() -> AsyncGenerator[StepOutput, None]:
        request = await build_request(body, plan, ctx, engine, meta.id, arrival, cache_salt=salt)
        usage.prompt_tokens = len(request.prompt_token_ids)
        return await open_generation(engine, request, recorder)

    assert ctx.token_bytes is not None
    n, token_bytes = body.num_choices, ctx.token_bytes
    if body.stream:
        outputs = await cancel_on_disconnect(http, start())
        return SSEResponse(stream_chunks(outputs, meta, n, usage, token_bytes, plan))

    async def run() -> ChatCompletionResponse:
        return await collect(await start(), meta, n, usage, token_bytes, plan, body.prompt_logprobs)

    response = await cancel_on_disconnect(http, run())
    return JSONResponse(response.model_dump(mode="json"))


# ----------------------------------------------------------------------------------------- request building
async def build_request(
    body: ChatCompletionRequest,
    plan: ToolPlan,
    ctx: ServerContext,
    engine: EngineClient,
    request_id: str,
    arrival: float,
    cache_salt: str | None = None,
) -> EngineRequest:
    assert ctx.processor is not None
    params = body.to_sampling_params(ctx.processor.tokenizer.get_vocab_size())
    check_caps(params, ctx.config)
    answer = structured_output_of(body)
    param = answer[1] if answer is not None else "tool_choice"
    grammar = plan.grammar(answer[0] if answer is not None else None, param)
    params = await constrain(params, engine, grammar, param, body.prompt_logprobs)
    return await chat_engine_request(
        body.messages, params, plan.prompt_tools, ctx, engine, request_id, arrival, cache_salt
    )


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
    plan: ToolPlan,
) -> AsyncIterator[str]:
    """Role chunk per choice, content / tool-call deltas, a finish chunk per choice, the usage chunk if asked,
    [DONE]."""
    parsers = [plan.parser() for _ in range(n)]
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
                for event in _events(out, meta, token_bytes, parsers[out.index], plan):
                    yield event
            else:
                if meta.include_usage:
                    yield sse.event(meta.chunk([], usage=usage.usage()))
    except Exception as exc:  # the engine died mid-stream: the status line is sent, so report it in-band
        yield sse.error_event(error_body(exc))
    yield sse.DONE


def _events(
    out: StepOutput, meta: ChatMeta, token_bytes: TokenBytes, parser: ToolCallParser | None, plan: ToolPlan
) -> Iterator[str]:
    """One StepOutput as SSE events: its deltas (content, or tool calls when tools are parsed; logprobs on the
    first), then its finish chunk if it has one."""
    logprobs = ChoiceLogprobs(content=chat_logprobs(out.logprobs, token_bytes)) if out.logprobs else None
    if parser is None:
        deltas = [Delta(content=out.text)] if out.text or out.logprobs else []
    else:
        events = parser.feed(out.text) if out.text else []
        if out.finish_reason is not None:
            events += parser.finish()
        deltas = [_delta(e) for e in events] or ([Delta()] if logprobs else [])
    for i, delta in enumerate(deltas):
        yield sse.event(meta.chunk([_choice(out.index, delta, logprobs if i == 0 else None)]))
    if out.finish_reason is not None:
        reason = plan.finish_reason(out.finish_reason.value, parser is not None and parser.called)
        yield sse.event(meta.chunk([_choice(out.index, Delta(), finish=reason)]))


def _delta(event: ToolEvent) -> Delta:
    if event.content is not None:
        return Delta(content=event.content)
    assert event.index is not None
    if event.call is not None:  # a new call: id, type and name first, as OpenAI streams them
        function = FunctionCallDelta(name=event.call.name, arguments="")
        return Delta(
            tool_calls=[
                ToolCallDelta(index=event.index, id=event.call.id, type="function", function=function)
            ]
        )
    return Delta(
        tool_calls=[ToolCallDelta(index=event.index, function=FunctionCallDelta(arguments=event.arguments))]
    )


async def collect(
    outputs: AsyncGenerator[StepOutput, None],
    meta: ChatMeta,
    n: int,
    usage: UsageCounter,
    token_bytes: TokenBytes,
    plan: ToolPlan,
    num_prompt_logprobs: int | None = None,
) -> ChatCompletionResponse:
    texts: list[list[str]] = [[] for _ in range(n)]
    logprobs: list[list[Any] | None] = [None] * n
    finish: list[str | None] = [None] * n
    prompt_scores = None
    async with aclosing(outputs):
        async for out in outputs:
            usage.observe(out)
            failure = failure_of(out)
            if failure is not None:
                raise failure
            texts[out.index].append(out.text)
            if out.prompt_logprobs is not None:
                prompt_scores = prompt_logprobs_out(out.prompt_logprobs, num_prompt_logprobs or 0)
            if out.logprobs is not None:
                logprobs[out.index] = (logprobs[out.index] or []) + chat_logprobs(out.logprobs, token_bytes)
            if out.finish_reason is not None:
                finish[out.index] = out.finish_reason.value
    choices = []
    for i in range(n):
        message, called = _message("".join(texts[i]), plan.parser())
        choices.append(
            ChatCompletionChoice(
                index=i,
                message=message,
                logprobs=ChoiceLogprobs(content=logprobs[i]) if logprobs[i] is not None else None,
                finish_reason=plan.finish_reason(reason, called)
                if (reason := finish[i]) is not None
                else None,
            )
        )
    return ChatCompletionResponse(
        id=meta.id,
        created=meta.created,
        model=meta.model,
        choices=choices,
        usage=usage.usage(),
        system_fingerprint=SYSTEM_FINGERPRINT,
        prompt_logprobs=prompt_scores,
    )


def _message(text: str, parser: ToolCallParser | None) -> tuple[AssistantMessage, bool]:
    """The assistant message of one choice's whole text: content, and tool calls when tools are parsed."""
    if parser is None:
        return AssistantMessage(content=text), False
    parser.feed(text)
    parser.finish()
    calls = [
        ToolCallOut(id=c.id, function=FunctionCallOut(name=c.name, arguments=c.arguments))
        for c in parser.calls
    ]
    content = parser.content if parser.content or not calls else None
    return AssistantMessage(content=content, tool_calls=calls or None), parser.called
