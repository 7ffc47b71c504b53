"""Live servers on loopback ports: a real `plm-serve` process (for tests that need the CLI, signals or a pooled
client), or an app served by uvicorn in a thread of the test process (`serving_in_thread`)."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import uvicorn


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(base_url: str, timeout_s: float, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the server exited with status {proc.returncode} before becoming healthy")
        try:
            if httpx.get(f"{base_url}/health", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    raise TimeoutError(f"{base_url} did not become healthy in {timeout_s}s")


@contextmanager
def serving_in_thread(app: object, log_level: str = "warning") -> Iterator[str]:
    """uvicorn serving `app` in a daemon thread on a free loopback port; yields the base URL once /health is 200."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    base_url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    server = uvicorn.Server(uvicorn.Config(app, log_level=log_level))  # type: ignore[arg-type]
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        wait_healthy(base_url, 60)
        yield base_url
    finally:
        server.should_exit = True
        thread.join(30)


@contextmanager
def start_server(
    args: list[str], env: dict[str, str], log_path: Path, timeout_s: float = 180
) -> Iterator[str]:
    """`python -m plm_serve.server ARGS` (must include --port); yields its base URL once /health is 200.

    The process is killed on exit if still running; its output is in `log_path` (shown when start-up fails)."""
    port = args[args.index("--port") + 1]
    base_url = f"http://127.0.0.1:{port}"
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "plm_serve.server", *args], env=env, stdout=log, stderr=subprocess.STDOUT
        )
        try:
            try:
                wait_healthy(base_url, timeout_s, proc)
            except (RuntimeError, TimeoutError) as exc:
                raise RuntimeError(f"{exc}; server log:\n{log_path.read_text()[-4000:]}") from None
            yield base_url
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)
