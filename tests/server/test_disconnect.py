"""A client that goes away aborts its request in the engine at once: mid-stream, before the first byte of a
stream, and while waiting for a non-streaming answer. Driven through raw ASGI so the disconnect is exact."""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from plm_serve.server.app import create_app
from plm_serve.server.config import ServerConfig
from tests.server.conftest import MODEL_NAME, chat_body
from tests.server.fake_engine import FakeEngine


async def call(app, body: dict, *, disconnect_when) -> list[dict]:
    """POST `body` to /v1/chat/completions; `disconnect_when(sent)` decides when the client vanishes."""
    raw = json.dumps(body).encode()
    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/v1/chat/completions",
        "raw_path": b"/v1/chat/completions",
        "query_string": b"",
        "root_path": "",
        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(raw)).encode())],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8000),
    }
    sent: list[dict] = []
    gone = asyncio.Event()
    body_sent = False

    async def receive():
        nonlocal body_sent
        if not body_sent:
            body_sent = True
            return {"type": "http.request", "body": raw, "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)
        if disconnect_when(sent):
            gone.set()

    async def watchdog():
        while not gone.is_set():
            if disconnect_when(sent):
                gone.set()
            await asyncio.sleep(0.005)

    task = asyncio.ensure_future(watchdog())
    try:
        await asyncio.wait_for(app(scope, receive, send), timeout=10)
    finally:
        task.cancel()
    return sent


def make_app(ckpt_l, processor, engine: FakeEngine):
    return create_app(
        ServerConfig(model=str(ckpt_l), served_model_name=MODEL_NAME), engine, processor=processor
    )


def content_chunks(sent: list[dict]) -> int:
    bodies = [m.get("body", b"") for m in sent if m["type"] == "http.response.body"]
    return sum(1 for b in bodies if b'"content":"' in b and b'"content":""' not in b)


@pytest.fixture
def slow() -> FakeEngine:
    return FakeEngine(step_delay_s=0.05)


def test_disconnect_mid_stream_aborts_at_once(ckpt_l, processor, slow):
    app = make_app(ckpt_l, processor, slow)
    start = time.monotonic()
    sent = asyncio.run(
        call(app, chat_body("Hi", stream=True), disconnect_when=lambda s: content_chunks(s) >= 2)
    )
    assert time.monotonic() - start < 0.4  # 10 steps of 50 ms would take 0.5 s
    (request,) = slow.submitted
    assert slow.running == set() and slow.closed_early == [request.request_id]
    assert content_chunks(sent) < 10 and not any(b"[DONE]" in m.get("body", b"") for m in sent)


def test_disconnect_before_the_first_token_of_a_stream(ckpt_l, processor):
    engine = FakeEngine(step_delay_s=1.0)  # long queue/prefill: nothing is sent yet
    app = make_app(ckpt_l, processor, engine)
    start_time = time.monotonic()
    sent = asyncio.run(
        call(app, chat_body("Hi", stream=True), disconnect_when=lambda s: time.monotonic() - start_time > 0.1)
    )
    assert time.monotonic() - start_time < 0.8
    assert engine.running == set() and len(engine.closed_early) == 1
    assert not any(m["type"] == "http.response.body" and m.get("body") for m in sent)
    assert (
        app.state.ctx.metrics.registry.get_sample_value(
            "plm_http_requests_total", {"route": "/v1/chat/completions", "status": "499"}
        )
        == 1.0
    )


def test_disconnect_while_waiting_for_a_non_streaming_answer(ckpt_l, processor, slow):
    app = make_app(ckpt_l, processor, slow)
    start_time = time.monotonic()
    asyncio.run(call(app, chat_body("Hi"), disconnect_when=lambda s: time.monotonic() - start_time > 0.12))
    assert time.monotonic() - start_time < 0.4
    assert slow.running == set() and len(slow.closed_early) == 1


def test_a_client_that_stays_gets_everything(ckpt_l, processor, slow):
    app = make_app(ckpt_l, processor, slow)
    sent = asyncio.run(call(app, chat_body("Hi", stream=True), disconnect_when=lambda s: False))
    assert content_chunks(sent) == 10 and b"[DONE]" in sent[-2]["body"] + sent[-1]["body"]
    assert slow.closed_early == [] and slow.abort_calls == []
