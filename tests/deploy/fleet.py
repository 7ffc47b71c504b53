"""A scale-out fleet on loopback: demo `plm-serve` replicas and smg routers, as separate processes.

Everything binds 127.0.0.1 on free ports, logs to files under the test's temporary folder, and is stopped by
`Fleet.close()`: nothing is left running and no traffic leaves the machine.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from tests.deploy.files import DEPLOY

BIN = Path(sys.executable).parent
ROUTER_SCRIPT = DEPLOY / "router" / "smg-launch.sh"
# The router names the replica it chose in every response (smg's own header).
ROUTED_WORKER_HEADER = "x-smg-routed-worker-id"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Process:
    name: str
    proc: subprocess.Popen
    log: Path

    def tail(self, lines: int = 30) -> str:
        text = self.log.read_text(encoding="utf-8", errors="replace") if self.log.exists() else ""
        return f"--- {self.name} ({self.log}):\n" + "\n".join(text.splitlines()[-lines:])


@dataclass
class Fleet:
    folder: Path
    env: dict[str, str]
    processes: list[Process] = field(default_factory=list)

    def start(self, name: str, argv: list[str]) -> Process:
        log = self.folder / f"{name}.log"
        with log.open("w") as out:
            proc = subprocess.Popen(argv, env=self.env, stdout=out, stderr=subprocess.STDOUT)
        process = Process(name, proc, log)
        self.processes.append(process)
        return process

    def start_replica(self, name: str, port: int) -> Process:
        """The demo model (no --model) on the CPU, JSON logs, a 1 s drain so teardown is quick; cached-token
        counts reported (off by default), which the placement test reads."""
        argv = [str(BIN / "plm-serve"), "--host", "127.0.0.1", "--port", str(port), "--device", "cpu"]
        argv += ["--report-cached-tokens"]
        return self.start(name, [*argv, "--log-format", "json", "--shutdown-grace-seconds", "1"])

    def start_router(
        self, name: str, port: int, metrics_port: int, workers: list[str], *extra: str
    ) -> Process:
        """The shipped launcher with loopback overrides (later flags win) and 1 s health checks."""
        argv = ["sh", str(ROUTER_SCRIPT), "--host", "127.0.0.1", "--port", str(port)]
        argv += ["--prometheus-host", "127.0.0.1", "--prometheus-port", str(metrics_port)]
        argv += ["--health-check-interval-secs", "1", "--worker-startup-check-interval", "1"]
        argv += ["--shutdown-grace-period-secs", "1"]
        return self.start(name, [*argv, "--worker-urls", *workers, *extra])

    def wait_ok(self, process: Process, url: str, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if process.proc.poll() is not None:
                raise RuntimeError(f"{process.name} exited with {process.proc.returncode}\n{process.tail()}")
            try:
                if httpx.get(url, timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"{url} not ready in {timeout_s}s\n{process.tail()}")

    def close(self) -> None:
        for p in self.processes:
            if p.proc.poll() is None:
                p.proc.send_signal(signal.SIGTERM)
        for p in self.processes:
            try:
                p.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.proc.kill()
                p.proc.wait(timeout=5)


def fleet_env(cache: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PLM_API_KEY", "RUST_LOG")}
    env["XDG_CACHE_HOME"] = str(cache)  # the demo checkpoint, built once before the replicas start
    env["OMP_NUM_THREADS"] = "1"  # two replicas and the test share the cores: no oversubscribed torch pools
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"  # the launcher finds this environment's smg
    return env


def scrape(base_url: str) -> dict[str, float]:
    """Unlabelled samples of a Prometheus text page: {name: value}."""
    text = httpx.get(f"{base_url}/metrics", timeout=5).text
    return {m[1]: float(m[2]) for m in re.finditer(r"^([a-z_:]+) ([0-9.e+-]+)$", text, re.M)}
