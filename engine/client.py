"""`EngineClient`: what a frontend needs of an engine, as a typing protocol.

`AsyncEngine` satisfies it (its loop thread runs an `EngineCore` in this process); the server is typed against
it, so a test double (tests/server/fake_engine.py) or a later engine in another process fits the same seat.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from plm_serve.engine.core import EngineStats
    from plm_serve.engine.request import EngineRequest, StepOutput, StructuredOutputParams


class EngineClient(Protocol):
    @property
    def max_model_len(self) -> int:
        """Longest sequence (prompt + output) in tokens."""
        ...

    @property
    def is_healthy(self) -> bool:
        """False once the engine loop died: the server answers 503 and an orchestrator should restart it."""
        ...

    def generate(self, request: EngineRequest) -> AsyncGenerator[StepOutput, None]:
        """Submit a request and stream its outputs (every choice) until all choices finished.

        Raises EngineOverloadedError (queue full), EngineDeadError (not running) or RequestRejectedError.
        Closing the iterator early aborts the request."""
        ...

    async def compile_grammar(self, params: StructuredOutputParams) -> None:
        """Compile (and cache) a structured-output constraint off the engine thread, before `generate`.

        Raises StructuredOutputError (the constraint cannot compile) or StructuredOutputUnavailable."""
        ...

    async def abort(self, request_id: str) -> None: ...

    async def shutdown(self, grace_s: float = 30.0) -> None:
        """Stop accepting, let running requests finish for up to `grace_s`, abort the rest, stop."""
        ...

    def stats(self) -> EngineStats:
        """Gauges and counters, safe to read from any thread."""
        ...
