"""Server-sent events as OpenAI streams them: `data: <json>\n\n` per event, then `data: [DONE]\n\n`."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import anyio
from pydantic import BaseModel
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

DONE = "data: [DONE]\n\n"


def event(payload: BaseModel) -> str:
    """One event. `exclude_unset`: a chunk carries only what was set on it (the role only in the first
    delta)."""
    return f"data: {payload.model_dump_json(exclude_unset=True)}\n\n"


def error_event(body: dict[str, Any]) -> str:
    """An error after the stream started (the 200 status line is already sent): OpenAI's error body as an
    event."""
    return f"data: {json.dumps(body)}\n\n"


class SSEResponse(StreamingResponse):
    """A text/event-stream response that always closes its event generator when the response ends.

    Starlette cancels the stream when the client disconnects, but if the failure happens in `send` rather than
    inside the generator, the generator would only be finalized at garbage collection; closing it here runs
    its cleanup (the engine abort) at once.
    """

    def __init__(self, events: AsyncIterator[str]) -> None:
        super().__init__(
            events,
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
        self.events = events

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                await self.events.aclose()  # type: ignore[attr-defined]
