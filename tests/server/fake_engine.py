"""FakeEngine: `engine.AsyncEngine`'s interface with scripted outputs, for fast server tests without a model.

Every choice emits the same words, one token per step, until `max_tokens` ("length") or the end of the
script ("stop"). It records what the server submitted and which requests were aborted, and it tracks "running"
requests the way the real engine holds KV blocks, so tests can assert that nothing leaks after a disconnect.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from plm_serve.engine import (
    EngineDeadError,
    EngineOverloadedError,
    EngineRequest,
    EngineStats,
    FinishReason,
    RequestRejectedError,
    StepOutput,
    StructuredOutputParams,
    TokenLogprob,
)

WORDS = ["The", " quick", " brown", " fox", " jumps", " over", " the", " lazy", " dog", "."]
# Llama-3 ids of WORDS (each word is one token), so token ids, texts and bytes agree like a real engine's.
WORD_IDS = [791, 4062, 14198, 39935, 35308, 927, 279, 16053, 5679, 13]


@dataclass
class FakeEngine:
    max_model_len: int = 4096
    step_delay_s: float = 0.0
    script: list[str] = field(default_factory=lambda: list(WORDS))
    script_ids: list[int] = field(default_factory=lambda: list(WORD_IDS))
    num_cached_tokens: int = 0
    fail_with: Exception | None = None  # raised at the first __anext__ (queue full, dead, rejected)
    error_at_step: int | None = None  # emit FinishReason.ERROR at this step
    is_healthy: bool = True

    submitted: list[EngineRequest] = field(default_factory=list)
    running: set[str] = field(default_factory=set)
    closed_early: list[str] = field(default_factory=list)  # generator closed before the end (client gone)
    abort_calls: list[str] = field(default_factory=list)
    accepting: bool = True
    shutdown_calls: list[float] = field(default_factory=list)
    compiled: list[StructuredOutputParams] = field(default_factory=list)  # grammars the server had compiled
    _abort_events: dict[str, asyncio.Event] = field(default_factory=dict)

    async def generate(self, request: EngineRequest):
        if not self.is_healthy:
            raise EngineDeadError("the engine loop died")
        if not self.accepting:
            raise EngineDeadError("the server is shutting down")
        if self.fail_with is not None:
            raise self.fail_with
        budget = request.sampling.max_tokens
        if budget is not None and len(request.prompt_token_ids) + budget > self.max_model_len:
            raise RequestRejectedError(f"prompt + max_tokens exceeds max_model_len={self.max_model_len}")
        self.submitted.append(request)
        self.running.add(request.request_id)
        aborted = self._abort_events.setdefault(request.request_id, asyncio.Event())
        finished = False
        try:
            async for out in self._outputs(request, aborted):
                yield out
            finished = True
        finally:
            self.running.discard(request.request_id)
            if not finished:
                self.closed_early.append(request.request_id)

    async def _outputs(self, request: EngineRequest, aborted: asyncio.Event):
        params = request.sampling
        length = len(self.script) if params.max_tokens is None else min(params.max_tokens, len(self.script))
        for step in range(length):
            await asyncio.sleep(self.step_delay_s)
            last = step == length - 1
            for index in range(params.n):
                if aborted.is_set():
                    yield self._out(request, index, step, "", FinishReason.ABORT)
                elif self.error_at_step == step:
                    yield self._out(request, index, step, "", FinishReason.ERROR, error="boom")
                else:
                    reason = None
                    if last:
                        reason = FinishReason.LENGTH if length == params.max_tokens else FinishReason.STOP
                    yield self._out(request, index, step, self.script[step], reason)
            if aborted.is_set() or self.error_at_step == step:
                return

    def _out(self, request, index, step, text, reason, error=None) -> StepOutput:
        token_ids = [self.script_ids[step]] if text else []
        logprobs = None
        if request.sampling.logprobs is not None and text:
            top = [(self.script_ids[step], text, -0.25), (13, ".", -1.75)][: request.sampling.logprobs]
            logprobs = [TokenLogprob(self.script_ids[step], text, -0.25, top)]
        return StepOutput(
            request_id=request.request_id,
            index=index,
            text=text,
            token_ids=token_ids,
            finish_reason=reason,
            logprobs=logprobs,
            num_prompt_tokens=len(request.prompt_token_ids),
            num_cached_tokens=self.num_cached_tokens,
            num_output_tokens=step + (1 if text else 0),
            queue_time_s=0.001 if step == 0 else None,
            error=error,
        )

    async def compile_grammar(self, params: StructuredOutputParams) -> None:
        """Records the grammar; the outputs follow the script, not the grammar (live tests check those)."""
        self.compiled.append(params)

    async def abort(self, request_id: str) -> None:
        self.abort_calls.append(request_id)
        event = self._abort_events.get(request_id)
        if event is not None:
            event.set()

    def stats(self) -> EngineStats:
        return EngineStats(
            num_running=len(self.running),
            num_waiting=0,
            kv_usage=0.25 if self.running else 0.0,
            num_kv_blocks=128,
            prefix_cache_queries=100,
            prefix_cache_hits=40,
            encoder_cache_queries=4,
            encoder_cache_hits=1,
            num_preemptions=0,
        )

    async def shutdown(self, grace_s: float) -> None:
        """Like the real engine: refuse new requests, wait up to grace_s, then abort what still runs."""
        self.shutdown_calls.append(grace_s)
        self.accepting = False
        deadline = asyncio.get_running_loop().time() + grace_s
        while self.running and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.01)
        for request_id in list(self.running):
            await self.abort(request_id)

    async def wait_idle(self, timeout_s: float = 5.0) -> None:
        deadline = asyncio.get_running_loop().time() + timeout_s
        while self.running and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.01)


def overloaded() -> EngineOverloadedError:
    return EngineOverloadedError("the server is overloaded: 8 requests are waiting (limit 8); retry later")
