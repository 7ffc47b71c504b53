"""A real `plm-serve` process on a loopback port, for tests that need the CLI, signals or a pooled client."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx


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
