"""The server process as an orchestrator sees it (a real `plm-serve` subprocess on a loopback port): SIGTERM
drains (the listener stays up, /health and new requests answer 503, a running stream completes, exit 0), a
second signal forces the exit, and connections that never send a complete request are closed."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.server.test_live import free_port, wait_healthy

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def start_server(ckpt_l, tmp_path):
    procs: list[subprocess.Popen] = []

    def start(*flags: str) -> tuple[subprocess.Popen, str, Path]:
        port = free_port()
        log_path = tmp_path / f"server-{port}.log"
        cmd = [sys.executable, "-m", "plm_serve.server", "--model", str(ckpt_l), "--port", str(port)]
        cmd += ["--device", "cpu", "--dtype", "float32", "--num-kv-blocks", "512", *flags]
        env = {k: v for k, v in os.environ.items() if k != "PLM_API_KEY"}
        with log_path.open("w") as log:
            proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        procs.append(proc)
        base_url = f"http://127.0.0.1:{port}"
        wait_healthy(base_url, 120)
        return proc, base_url, log_path

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def long_stream_body(tokens: int) -> dict:
    return {
        "messages": [{"role": "user", "content": "Go on."}],
        "stream": True,
        "max_tokens": tokens,
        "min_tokens": tokens,
        "ignore_eos": True,
    }


def stream_in_thread(
    base_url: str, body: dict, started: threading.Event, events: list[str]
) -> threading.Thread:
    def read() -> None:
        with httpx.stream("POST", f"{base_url}/v1/chat/completions", json=body, timeout=60) as resp:
            for line in resp.iter_lines():
                if line.startswith("data: "):
                    events.append(line[6:])
                    if len(events) == 3:
                        started.set()

    thread = threading.Thread(target=read, daemon=True)
    thread.start()
    assert started.wait(60), "the stream did not start"
    return thread


def test_sigterm_drains_with_health_503_and_the_stream_completes_then_exit_0(start_server):
    proc, base_url, log_path = start_server("--shutdown-grace-seconds", "60", "--header-read-timeout-s", "1")

    # A connection that never completes its request head is closed after --header-read-timeout-s.
    with socket.create_connection(("127.0.0.1", int(base_url.rsplit(":", 1)[1])), timeout=10) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")  # no blank line: the head never ends
        t0 = time.monotonic()
        assert sock.recv(1024) == b""  # closed by the server, not answered
        assert 0.5 < time.monotonic() - t0 < 8

    events: list[str] = []
    started = threading.Event()
    reader = stream_in_thread(base_url, long_stream_body(200), started, events)
    proc.send_signal(signal.SIGTERM)
    statuses, refused = [], None
    while reader.is_alive():
        try:
            health = httpx.get(f"{base_url}/health", timeout=5)
            statuses.append(health.status_code)
            if refused is None:
                refused = httpx.post(f"{base_url}/v1/completions", json={"prompt": "x"}, timeout=5)
        except httpx.TransportError:
            statuses.append(None)  # the listener closed: only allowed once the stream is done
        time.sleep(0.05)
    reader.join()
    assert proc.wait(timeout=60) == 0, log_path.read_text()[-3000:]
    assert statuses and statuses[0] == 503 and None not in statuses, statuses
    assert refused is not None and refused.status_code == 503
    assert refused.json()["error"]["code"] == "engine_unavailable"
    assert events[-1] == "[DONE]"
    finishes = [
        json.loads(e)["choices"][0]["finish_reason"] for e in events[:-1] if json.loads(e).get("choices")
    ]
    assert finishes[-1] == "length"  # finished normally, not aborted
    content = "".join(json.loads(e)["choices"][0]["delta"].get("content") or "" for e in events[:-1])
    assert content and "error" not in events[-2]


def test_a_second_signal_forces_the_exit(ckpt_l, processor):
    """In-process (signals are delivered by calling the handler, as the signal module would): the first
    signal drains, /health turns 503 while the listener stays up, the second ends the server at once."""
    import uvicorn

    from plm_serve.server.__main__ import GracefulServer
    from plm_serve.server.app import create_app
    from plm_serve.server.config import ServerConfig
    from tests.server.conftest import MODEL_NAME
    from tests.server.fake_engine import FakeEngine

    engine = FakeEngine(step_delay_s=0.5)  # a 10-token stream takes 5 s
    app = create_app(
        ServerConfig(model=str(ckpt_l), served_model_name=MODEL_NAME), engine, processor=processor
    )
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    base_url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    server = GracefulServer(uvicorn.Config(app, log_level="warning"), app, grace_s=120)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    wait_healthy(base_url, 30)
    events: list[str] = []
    body = {"messages": [{"role": "user", "content": "x"}], "stream": True}
    cut: list[Exception] = []

    def read(client: httpx.Client) -> None:
        try:
            events.extend(client.post(f"{base_url}/v1/chat/completions", json=body).text.splitlines())
        except httpx.TransportError as exc:  # a forced exit cuts the stream: expected here
            cut.append(exc)

    with httpx.Client(timeout=30) as client:
        reader = threading.Thread(target=read, args=(client,), daemon=True)
        reader.start()
        while not engine.running:
            time.sleep(0.01)
        server.handle_exit(signal.SIGTERM, None)
        time.sleep(0.3)
        assert httpx.get(f"{base_url}/health", timeout=5).status_code == 503  # draining, not gone
        assert not server.should_exit and not server.forced
        t0 = time.monotonic()
        server.handle_exit(signal.SIGTERM, None)
        thread.join(15)
        reader.join(10)
    assert not thread.is_alive() and server.forced
    assert time.monotonic() - t0 < 10  # well before the 120 s grace period or the stream's end
    assert cut or "[DONE]" not in "".join(events)  # the stream did not get to finish
