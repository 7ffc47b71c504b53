"""Start the servers of a side-by-side run on loopback: plm-serve and `transformers serve --continuous-batching`.

Both serve the same checkpoint folder on 127.0.0.1 (a free port each), on the same device and dtype. Each
server's output goes to a log file; lines that change how a result reads (transformers falling back from
continuous batching, for one) are picked out into the results.
"""

from __future__ import annotations

import importlib.util
import os
import re
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from bench.serving.client import Target

# Log lines worth recording next to the numbers: those containing one of these (case-insensitively).
NOTABLE = ("does not support continuous batching", "falling back to sequential")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child_env() -> dict[str, str]:
    """The environment for a server process: ours, with `plm_serve` importable as it is here."""
    env = dict(os.environ)
    spec = importlib.util.find_spec("plm_serve")
    if spec is not None and spec.submodule_search_locations:
        roots = {str(Path(p).parent) for p in spec.submodule_search_locations}
        env["PYTHONPATH"] = os.pathsep.join([*sorted(roots), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


@dataclass
class ServerProcess:
    """A server started by the benchmark; a context manager that stops it (SIGTERM, then SIGKILL)."""

    name: str
    flavor: str
    argv: list[str]
    port: int
    model_id: str
    log_path: Path
    startup_timeout_s: float = 600.0
    proc: subprocess.Popen | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def target(self, request_timeout_s: float) -> Target:
        return Target(
            self.name,
            self.url,
            self.flavor,
            self.model_id,
            request_timeout_s=request_timeout_s,
            cpu_clock=self.cpu_seconds,
        )

    def __enter__(self) -> ServerProcess:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT, env=_child_env())
        try:
            self._wait_healthy()
        except BaseException:  # a timeout, a crash, Ctrl-C: never leave the server running
            self.__exit__(None, None, None)
            raise
        return self

    def _wait_healthy(self) -> None:
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}; log: {self.log_path}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2, trust_env=False).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        raise TimeoutError(
            f"{self.name} not healthy after {self.startup_timeout_s:.0f}s; log: {self.log_path}"
        )

    def cpu_seconds(self) -> float:
        """CPU time the server process has used so far (user + system, all its threads; Linux /proc)."""
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime

    def __exit__(self, *exc) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=30)

    def notes(self) -> list[str]:
        """Notable lines of the server's log (deduplicated, in order, without a logger prefix)."""
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        found: list[str] = []
        for line in text.splitlines():
            if any(key in line.lower() for key in NOTABLE):
                line = re.sub(r"^\[\w+\]\s*", "", line.strip())
                if line not in found:
                    found.append(line)
        return found


def plm_serve(model: Path, device: str, dtype: str, log_dir: Path, extra: list[str]) -> ServerProcess:
    port = free_port()
    name = "plm-serve"
    argv = [sys.executable, "-m", "plm_serve.server", "--model", str(model), "--served-model-name", name]
    argv += ["--host", "127.0.0.1", "--port", str(port), "--device", device, "--dtype", dtype]
    argv += ["--log-level", "warning", *extra]
    return ServerProcess(name, "vllm", argv, port, name, log_dir / "plm-serve.log")


def transformers_serve(
    model: Path, device: str, dtype: str, log_dir: Path, extra: list[str]
) -> ServerProcess:
    """`transformers serve MODEL --continuous-batching`; its model id is the path it was started with."""
    port = free_port()
    argv = [
        sys.executable,
        "-c",
        "from transformers.cli.transformers import main; main()",
        "serve",
        str(model),
    ]
    argv += ["--continuous-batching", "--host", "127.0.0.1", "--port", str(port), "--device", device]
    argv += ["--dtype", dtype, "--log-level", "warning", *extra]
    return ServerProcess("transformers", "transformers", argv, port, str(model), log_dir / "transformers.log")
