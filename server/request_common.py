"""Request building shared by chat, completions and the Responses API: sampling parameters with their output
constraint (compiled by the engine off its thread, so a bad schema is a 400 before anything is queued), media
fetched for the processor, the prompt budget, and the engine request."""

from __future__ import annotations

import asyncio
import dataclasses
import functools
from typing import Any

from plm_serve.engine import (
    EngineClient,
    EngineRequest,
    MMInput,
    SamplingParams,
    StructuredOutputError,
    StructuredOutputParams,
)
from plm_serve.processors import ImageInput, ProcessedPrompt, VideoInput
from plm_serve.server.deps import ServerContext
from plm_serve.server.errors import APIError, bad_request
from plm_serve.server.limits import with_output_budget
from plm_serve.server.protocol import ChatMessage, ImageURLPart, TextPart, VideoURLPart

SYSTEM_FINGERPRINT = "plm-serve"


async def constrain(
    params: SamplingParams,
    engine: EngineClient,
    grammar: StructuredOutputParams | None,
    param: str | None,
    prompt_logprobs: int | None = None,
) -> SamplingParams:
    """`params` with the output constraint (compiled now, on a worker thread) and prompt scoring set."""
    if grammar is not None:
        try:
            await engine.compile_grammar(grammar)
        except StructuredOutputError as exc:
            raise bad_request(str(exc), param=param, code="invalid_grammar") from None
    try:
        return dataclasses.replace(params, structured_output=grammar, prompt_logprobs=prompt_logprobs)
    except ValueError as exc:
        raise bad_request(str(exc), param="prompt_logprobs") from None


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


async def chat_engine_request(
    messages: list[ChatMessage],
    params: SamplingParams,
    tools: list[dict[str, Any]] | None,
    ctx: ServerContext,
    engine: EngineClient,
    request_id: str,
    arrival: float,
    cache_salt: str | None,
) -> EngineRequest:
    """Chat messages -> the engine request: media fetched, the template applied (on the executor, within what
    `max_tokens` leaves of the context), then `max_tokens` fitted to what the prompt leaves."""
    assert ctx.processor is not None
    limit = max_prompt_tokens(params, engine.max_model_len)
    loaded = await load_messages(messages, ctx)
    process = functools.partial(ctx.processor.process_chat, loaded, tools=tools, max_prompt_tokens=limit)
    prompt = await asyncio.get_running_loop().run_in_executor(ctx.executor, process)
    params = with_output_budget(params, len(prompt.token_ids), engine.max_model_len, ctx.config)
    return engine_request(request_id, prompt, params, arrival, cache_salt)


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
    if num_media > cfg.media.max_media_per_request:
        raise APIError(
            413,
            f"{num_media} images/videos in one request; the limit is {cfg.media.max_media_per_request}",
            param="messages",
            code="media_too_large",
        )
    converted: list[dict[str, Any]] = []
    pending: list[
        tuple[list[Any], int, asyncio.Future]
    ] = []  # (parts list, position, fetch producing the part)
    for mi, message in enumerate(messages):
        role = message.role  # the processor maps "developer" to "system" and validates the structure
        extra: dict[str, Any] = {}
        if message.tool_calls:
            extra["tool_calls"] = [call.model_dump() for call in message.tool_calls]
        if message.tool_call_id is not None:
            extra["tool_call_id"] = message.tool_call_id
        if not isinstance(message.content, list):
            converted.append({"role": role, "content": message.content, **extra})
            continue
        parts: list[Any] = []
        for pi, part in enumerate(message.content):
            param = f"messages[{mi}].content[{pi}]"
            if isinstance(part, TextPart):
                parts.append({"type": "text", "text": part.text})
            else:
                parts.append(None)
                pending.append((parts, pi, asyncio.ensure_future(_load_part(part, ctx, param))))
        converted.append({"role": role, "content": parts, **extra})
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
        data = await ctx.fetcher.fetch(
            img.url, max_bytes=cfg.media.max_image_bytes, param=f"{param}.image_url.url"
        )
        return ImageInput(data=data, detail=img.detail, max_num_tiles=img.max_num_tiles)
    video = part.video_url
    data = await ctx.fetcher.fetch(
        video.url, max_bytes=cfg.media.max_video_bytes, param=f"{param}.video_url.url"
    )
    return VideoInput(data=data, num_frames=video.num_frames, fps=video.fps)
