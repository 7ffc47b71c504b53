"""AsyncEngine: the engine loop on its own thread, with one asyncio queue per request.

Hop 1: `generate()` puts ("add", request) on the thread-safe inbox. The loop thread drains the inbox, runs
`EngineCore.step()`, and hop 2 hands each output to the event loop with `call_soon_threadsafe`. When the consumer
of `generate()` goes away (client disconnect: `aclose()` / cancellation), the request is aborted at once.

A step that fails is isolated by `EngineCore.step` (the request to blame fails alone). Only failures that
cannot be pinned on one request count towards `_MAX_CONSECUTIVE_FAILURES`; after that many in a row the
engine declares itself dead, every waiter gets `EngineDeadError` and `is_healthy` turns False (so /health
answers 503 and an orchestrator restarts the process): nobody hangs.

Threads: the event loop reads only `core.stats` (a snapshot the engine thread publishes), never the
scheduler.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field

from plm_serve.engine.config import EngineConfig
from plm_serve.engine.core import EngineCore, EngineStats
from plm_serve.engine.errors import EngineDeadError, EngineOverloadedError
from plm_serve.engine.request import EngineRequest, StepOutput, StructuredOutputParams

logger = logging.getLogger(__name__)

_MAX_CONSECUTIVE_FAILURES = 8  # unattributable step failures in a row before the engine declares itself dead


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    open_choices: int = 1


class AsyncEngine:
    def __init__(self, core: EngineCore) -> None:
        self.core = core
        self.max_model_len = core.max_model_len
        self.tokenizer = core.tokenizer
        self._inbox: queue.Queue = queue.Queue()
        self._streams: dict[str, _Stream] = {}
        self._lock = threading.Lock()  # guards _streams and _pending_adds between the two threads
        self._pending_adds = 0
        self._dead: BaseException | None = None
        self._accepting = True
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)
        self._thread.start()

    @classmethod
    def from_config(cls, config: EngineConfig) -> AsyncEngine:
        """Load the model, size the KV pool and start the loop thread (blocking: call it off the event loop)."""
        return cls(EngineCore.load(config))

    # ------------------------------------------------------------------------------------------- public API
    @property
    def is_healthy(self) -> bool:
        return self._dead is None and self._thread.is_alive()

    def stats(self) -> EngineStats:
        return self.core.stats

    async def generate(self, request: EngineRequest) -> AsyncGenerator[StepOutput, None]:
        """Stream the request's outputs (every choice); ends when all choices finished."""
        self._check_can_accept()
        if not request.arrival_time:
            request.arrival_time = time.monotonic()
        stream = _Stream(loop=asyncio.get_running_loop(), open_choices=request.sampling.n)
        with self._lock:
            if request.request_id in self._streams:
                raise ValueError(f"duplicate request id {request.request_id!r}")
            self._streams[request.request_id] = stream
            self._pending_adds += 1
        self._inbox.put(("add", request))
        finished = False
        try:
            while True:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                if item.finish_reason is not None:
                    stream.open_choices -= 1
                finished = stream.open_choices == 0
                yield item
                if finished:
                    return
        finally:
            with self._lock:
                self._streams.pop(request.request_id, None)
            if not finished:
                self._inbox.put(("abort", request.request_id))

    async def compile_grammar(self, params: StructuredOutputParams) -> None:
        """Compile and cache a structured-output grammar on a worker thread, so that the engine thread finds it
        compiled when the request arrives. Raises StructuredOutputError (a RequestRejectedError) if it does not
        compile."""
        await asyncio.to_thread(self.core.grammars.compile, params)

    async def abort(self, request_id: str) -> None:
        self._inbox.put(("abort", request_id))

    async def shutdown(self, grace_s: float = 30.0) -> None:
        """Stop accepting, let running requests finish for up to `grace_s`, abort the rest, stop the thread."""
        self._accepting = False
        deadline = time.monotonic() + grace_s
        while self._streams and time.monotonic() < deadline and self.is_healthy:
            await asyncio.sleep(0.05)
        for request_id in list(self._streams):
            self._inbox.put(("abort", request_id))
        self._stop.set()
        self._inbox.put(("wake", None))
        await asyncio.to_thread(self._thread.join, 10.0)

    def _check_can_accept(self) -> None:
        if not self.is_healthy:
            raise EngineDeadError(f"the engine is not running: {self._dead!r}")
        if not self._accepting:
            raise EngineDeadError("the server is shutting down")
        waiting = self.core.stats.num_waiting + self._pending_adds  # the published snapshot
        if waiting >= self.core.config.max_waiting_requests:
            raise EngineOverloadedError(
                f"the server is overloaded: {waiting} requests are waiting "
                f"(limit {self.core.config.max_waiting_requests}); retry later"
            )

    # ------------------------------------------------------------------------------------------- loop thread
    def _run(self) -> None:
        try:
            failures = 0
            while not self._stop.is_set():
                self._drain_inbox(block=not self.core.has_unfinished())
                if self._stop.is_set():
                    break
                outputs, failure = self._step()
                failures = failures + 1 if failure is not None else 0
                if failures >= _MAX_CONSECUTIVE_FAILURES:
                    raise RuntimeError(f"{failures} engine steps failed in a row: {failure!r}") from failure
                self._publish(outputs)
            # Stopping: apply the aborts `shutdown()` queued, so their streams end with an ABORT output.
            self._drain_inbox(block=False)
            self._fail_all(EngineDeadError("the server is shutting down"))
        except BaseException as exc:  # the loop died: nobody may hang
            logger.exception("engine loop died")
            self._dead = exc
            self._fail_all(EngineDeadError(f"the engine loop died: {type(exc).__name__}: {exc}"))

    def _step(self) -> tuple[list[StepOutput], Exception | None]:
        """One core step and its unattributable failure, if any. An exception out of the step itself (a bug
        outside the runner) fails every request in the engine, but not the loop."""
        try:
            return self.core.step(), self.core.unattributed_failure
        except Exception as exc:
            logger.exception("engine step raised; failing every request in the engine")
            with self._lock:
                request_ids = list(self._streams)
            outputs = [o for rid in request_ids for o in self.core.fail_request(rid, exc)]
            return outputs, exc

    def _drain_inbox(self, block: bool) -> None:
        try:
            item = self._inbox.get(block=block)
        except queue.Empty:
            return
        while True:
            self._handle(*item)
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return

    def _handle(self, kind: str, payload) -> None:
        if kind == "add":
            with self._lock:
                self._pending_adds -= 1
            try:
                self.core.add_request(payload)
            except Exception as exc:  # rejected: report to this request only
                self._send(payload.request_id, exc)
        elif kind == "abort":
            self._publish(self.core.abort_request(payload))

    def _publish(self, outputs: list[StepOutput]) -> None:
        for out in outputs:
            self._send(out.request_id, out)

    def _send(self, request_id: str, item) -> None:
        with self._lock:
            stream = self._streams.get(request_id)
        if stream is not None:
            stream.loop.call_soon_threadsafe(stream.queue.put_nowait, item)

    def _fail_all(self, exc: BaseException) -> None:
        with self._lock:
            streams = list(self._streams.values())
        for stream in streams:
            stream.loop.call_soon_threadsafe(stream.queue.put_nowait, exc)
