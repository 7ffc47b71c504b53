"""Connection-level deadlines uvicorn lacks: its h11 protocol with a deadline for each request's head.

uvicorn closes a kept-alive connection that stays idle after a response (`timeout_keep_alive`), but nothing
limits a connection that never sends a complete request line and headers: one that opens and sends nothing,
or a header byte a minute (slowloris), is held forever, and enough of them exhaust the server's file
descriptors. `head_deadline_protocol(seconds)` gives every connection `seconds` to deliver the head of its
next request, counted from when it opened or from its previous response; the body has its own deadline
(`middleware.RequestBody`). The timer runs on the event loop; nothing polls.
"""

from __future__ import annotations

import asyncio

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol


def head_deadline_protocol(seconds: float) -> type[H11Protocol]:
    """uvicorn's `H11Protocol` that closes a connection whose request head is not complete within `seconds`."""

    class HeadDeadlineH11Protocol(H11Protocol):
        _head_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self.conn.their_state is not h11.IDLE:  # the head arrived: the body deadline takes over
                self._disarm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm()  # the next request's head (the keep-alive timer closes an idle one sooner)

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _arm(self) -> None:
            self._disarm()
            self._head_timer = self.loop.call_later(seconds, self._expire)

        def _disarm(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _expire(self) -> None:
            self._head_timer = None
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                self.transport.close()

    return HeadDeadlineH11Protocol
