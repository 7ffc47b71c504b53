"""Drive the engine requests of one HTTP request: submit, surface submission errors as HTTP statuses, record
metrics, count usage, and make sure an abandoned request is aborted in the engine at once.

The pipeline is linear: `open_generation` -> AsyncGenerator[StepOutput, None] -> (chat.py / completions.py) chunks.
Cancellation is part of the design: whichever way iteration stops (client gone, error, shutdown), the engine's
own generator is closed immediately (its cleanup aborts the request) and `abort()` is sent as well,
idempotently.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncGenerator, Awaitable
from dataclasses import dataclass, field
from typing import TypeVar

import anyio
from starlette.requests import Request

from plm_serve.engine import EngineClient, EngineError, EngineRequest, FinishReason, StepOutput
from plm_serve.server.errors import APIError, ClientDisconnected, from_exception, service_unavailable
from plm_serve.server.metrics import RequestRecorder
from plm_serve.server.protocol import PromptTokensDetails, Usage

T = TypeVar("T")


async def open_generation(
    engine: EngineClient, request: EngineRequest, recorder: RequestRecorder
) -> AsyncGenerator[StepOutput, None]:
    """Submit `request` and wait for its first output, so that queue-full, shutdown and rejection errors raise
    here (and become 429/503/400) rather than inside an already-started 200 stream."""
    outputs = _drive(engine, request, recorder)
    try:
        first = await anext(outputs)
    except StopAsyncIteration:  # every choice finished without output: an empty, finished stream
        return _empty()
    recorder.admitted(first.num_prompt_tokens or len(request.prompt_token_ids))
    return _prepend(first, outputs)


async def _drive(
    engine: EngineClient, request: EngineRequest, recorder: RequestRecorder
) -> AsyncGenerator[StepOutput, None]:
    stream = engine.generate(request)
    open_choices = set(range(request.sampling.n))
    started = False
    try:
        async for out in stream:
            started = True
            recorder.observe(out)
            if out.finish_reason is not None:
                open_choices.discard(out.index)
            yield out
    except EngineError:
        if not started:
            open_choices.clear()  # refused at submission: there is nothing to abort
        raise
    finally:
        with anyio.CancelScope(shield=True):  # runs even while the surrounding task is being cancelled
            await stream.aclose()
            if open_choices:
                await engine.abort(request.request_id)
        if started:
            recorder.finish()


async def _prepend(
    first: StepOutput, rest: AsyncGenerator[StepOutput, None]
) -> AsyncGenerator[StepOutput, None]:
    try:
        yield first
        async for out in rest:
            yield out
    finally:
        with anyio.CancelScope(shield=True):
            await rest.aclose()


async def _empty() -> AsyncGenerator[StepOutput, None]:
    return
    yield


async def open_all(
    engine: EngineClient, requests: list[EngineRequest], recorders: list[RequestRecorder]
) -> list[AsyncGenerator[StepOutput, None]]:
    """`open_generation` for several prompts at once; if one is refused, the others are closed (aborted)."""
    results = await asyncio.gather(
        *(open_generation(engine, r, rec) for r, rec in zip(requests, recorders, strict=True)),
        return_exceptions=True,
    )
    failure = next((r for r in results if isinstance(r, BaseException)), None)
    if failure is not None:
        for r in results:
            if not isinstance(r, BaseException):
                await r.aclose()
        raise failure
    return results  # type: ignore[return-value]


async def merge(streams: list[AsyncGenerator[StepOutput, None]], n: int) -> AsyncGenerator[StepOutput, None]:
    """Interleave the outputs of several prompts as they come; choice `i` of prompt `p` becomes index
    `p * n + i` (OpenAI's numbering for a list of prompts)."""
    if len(streams) == 1:
        try:
            async for out in streams[0]:
                yield out
        finally:
            with anyio.CancelScope(shield=True):
                await streams[0].aclose()
        return
    queue: asyncio.Queue[tuple[int, StepOutput | BaseException | None]] = asyncio.Queue()

    async def pump(p: int, stream: AsyncGenerator[StepOutput, None]) -> None:
        try:
            async for out in stream:
                queue.put_nowait((p, out))
        except Exception as exc:
            queue.put_nowait((p, exc))
        finally:
            queue.put_nowait((p, None))

    tasks = [asyncio.ensure_future(pump(p, s)) for p, s in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            p, item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield dataclasses.replace(item, index=p * n + item.index)
    finally:
        for task in tasks:
            task.cancel()  # closes each prompt's stream, which aborts it in the engine
        with anyio.CancelScope(shield=True):
            await asyncio.gather(*tasks, return_exceptions=True)


async def cancel_on_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Run `work` while watching the connection; if the client disconnects first, cancel `work` (closing any
    engine stream inside it, which aborts the request at once) and raise ClientDisconnected.

    Used for non-streaming responses and for the wait before a stream's first byte; once a StreamingResponse
    runs, Starlette's own disconnect listener cancels the stream the same way.
    """
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if watcher.done() and not watcher.cancelled():
            watcher.exception()  # a failed receive() counts as a disconnect; mark its error as seen
        if not task.done():
            task.cancel()
            with anyio.CancelScope(shield=True):
                await asyncio.gather(task, return_exceptions=True)  # let its cleanup (abort) run
    if task.cancelled():
        raise ClientDisconnected()
    return task.result()


async def _wait_for_disconnect(request: Request) -> None:
    # After the body has been read, the next ASGI message can only be `http.disconnect`.
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


@dataclass
class UsageCounter:
    """Exact usage: prompt tokens as submitted (media placeholders included), completion tokens summed over
    choices, cached tokens as the engine reports them (only with `report_cached`: on a shared server the
    count reveals what others sent, see ServerConfig.report_cached_tokens)."""

    report_cached: bool = True
    prompt_tokens: int = 0
    # per prompt index (/v1/completions takes several prompts)
    cached_tokens: dict[int, int] = field(default_factory=dict)
    # per choice index: the latest cumulative count
    output_tokens: dict[int, int] = field(default_factory=dict)

    def observe(self, out: StepOutput, prompt_index: int = 0) -> None:
        self.output_tokens[out.index] = out.num_output_tokens
        self.cached_tokens[prompt_index] = max(self.cached_tokens.get(prompt_index, 0), out.num_cached_tokens)

    def usage(self) -> Usage:
        completion = sum(self.output_tokens.values())
        details = None
        if self.report_cached:
            details = PromptTokensDetails(cached_tokens=sum(self.cached_tokens.values()))
        return Usage(
            prompt_tokens=self.prompt_tokens,
            completion_tokens=completion,
            total_tokens=self.prompt_tokens + completion,
            prompt_tokens_details=details,
        )


def failure_of(out: StepOutput) -> APIError | None:
    """An output that ends its choice abnormally, as the error to report (None for stop/length)."""
    if out.finish_reason is FinishReason.ERROR:
        return APIError(500, f"generation failed: {out.error or 'engine error'}", type="server_error")
    if out.finish_reason is FinishReason.ABORT:
        return service_unavailable("the request was aborted by the server (shutting down)")
    return None


def error_body(exc: BaseException) -> dict:
    return from_exception(exc).body()
