"""Soak the server on loopback: mixed traffic with disconnects and bad requests, then check nothing leaked.

    python bench/soak.py                       # the built-in demo model, 60 s, 16 concurrent clients
    python bench/soak.py --model PATH --seconds 600 --clients 64

Starts `python -m plm_serve.server` on 127.0.0.1 (a free port), then runs `--clients` loops for `--seconds`, each picking
one of: text chat (streamed or not), chat with a data-URL image (full or `detail: "low"`), a stream that the
client abandons after the first chunk, a request with a bad parameter, and an over-long prompt. Afterwards it
checks: every response had the expected status (no 5xx), /health is 200, no request is still running or waiting,
the KV pool is empty, and the server's resident memory did not keep growing. Prints a table, writes it to
bench/results/. Traffic goes only to the server it started on loopback, and every loop is bounded in time.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import collections
import datetime
import io
import os
import random
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def image_url(seed: int) -> str:
    rng = random.Random(seed)
    img = Image.new("RGB", (640, 480), tuple(rng.randrange(256) for _ in range(3)))
    buf = io.BytesIO()
    img.save(buf, format="JPEG")
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def metric(text: str, name: str) -> float:
    match = re.search(rf"^{name} ([0-9.eE+-]+)$", text, re.M)
    return float(match.group(1)) if match else float("nan")


class Soak:
    def __init__(self, base: str, model: str, seed: int) -> None:
        self.base, self.model = base, model
        self.rng = random.Random(seed)
        self.images = [image_url(i) for i in range(4)]
        self.counts: collections.Counter[str] = collections.Counter()
        self.unexpected: list[str] = []

    def body(self, content, **extra) -> dict:
        return {
            "model": self.model,
            "messages": [{"role": "user", "content": content}],
            "max_tokens": 8,
            **extra,
        }

    async def one(self, client: httpx.AsyncClient) -> None:
        kind = self.rng.choice(["text", "stream", "image", "image-low", "abandon", "bad-param", "too-long"])
        url = f"{self.base}/v1/chat/completions"
        image = {"type": "image_url", "image_url": {"url": self.rng.choice(self.images)}}
        expected = 200
        if kind == "text":
            body = self.body("Say something.")
        elif kind == "stream":
            body = self.body("Count to three.", stream=True)
        elif kind in ("image", "image-low"):
            if kind == "image-low":
                image["image_url"]["detail"] = "low"
            body = self.body([image, {"type": "text", "text": "What is this?"}])
        elif kind == "bad-param":
            body, expected = self.body("Hi", temperature=-1), 400
        elif kind == "too-long":
            body, expected = self.body("word " * 20_000), 400
        else:  # abandon a stream after its first chunk: the server must abort it and free its blocks
            async with client.stream("POST", url, json=self.body("Tell a long story.", stream=True)) as r:
                self.record(kind, r.status_code, 200)
                async for _ in r.aiter_lines():
                    break
            return
        r = await client.post(url, json=body)
        self.record(kind, r.status_code, expected)

    def record(self, kind: str, status: int, expected: int) -> None:
        self.counts[f"{kind} {status}"] += 1
        if status != expected:
            self.unexpected.append(f"{kind}: {status} (expected {expected})")

    async def run(self, clients: int, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        async with httpx.AsyncClient(timeout=120) as client:

            async def loop() -> None:
                while time.monotonic() < deadline:
                    await self.one(client)

            await asyncio.gather(*(loop() for _ in range(clients)))


def start_server(args: argparse.Namespace, port: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "plm_serve.server", "--port", str(port), "--max-num-seqs", "32"]
    if args.model:
        cmd += ["--model", args.model]
    return subprocess.Popen(
        cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=os.environ
    )


def wait_ready(base: str, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("the server exited during start-up")
        try:
            if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError("the server did not become ready")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default=None)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--results", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args()

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    proc = start_server(args, port)
    try:
        wait_ready(base, proc)
        model = httpx.get(f"{base}/v1/models").json()["data"][0]["id"]
        soak = Soak(base, model, args.seed)
        asyncio.run(soak.run(args.clients, 5))  # warm-up, so the memory baseline includes steady-state caches
        rss_start = rss_mb(proc.pid)
        t0 = time.monotonic()
        asyncio.run(soak.run(args.clients, args.seconds))
        elapsed = time.monotonic() - t0
        time.sleep(1.0)  # let aborts of abandoned streams land
        rss_end = rss_mb(proc.pid)
        metrics = httpx.get(f"{base}/metrics").text
        health = httpx.get(f"{base}/health").status_code
    finally:
        proc.terminate()
        proc.wait(timeout=60)

    checks = {
        "no unexpected status": not soak.unexpected,
        "/health is 200 afterwards": health == 200,
        "no request running": metric(metrics, "plm_num_requests_running") == 0,
        "no request waiting": metric(metrics, "plm_num_requests_waiting") == 0,
        "KV pool empty": metric(metrics, "plm_kv_cache_usage_perc") == 0,
        "RSS growth < 10%": rss_end < rss_start * 1.10,
    }
    total = sum(soak.counts.values())
    lines = [
        f"# Soak, {datetime.date.today()}",
        "",
        f"`python bench/soak.py --seconds {args.seconds:g} --clients {args.clients}` on "
        f"{'the demo model' if not args.model else args.model}; {total} requests in {elapsed:.0f} s "
        f"({total / elapsed:.1f} req/s); server RSS {rss_start:.0f} -> {rss_end:.0f} MB",
        "",
        "| check | result |",
        "|---|---|",
        *(f"| {name} | {'ok' if ok else 'FAILED'} |" for name, ok in checks.items()),
        "",
        "| request kind and status | count |",
        "|---|---|",
        *(f"| {k} | {v} |" for k, v in sorted(soak.counts.items())),
    ]
    if soak.unexpected:
        lines += ["", "Unexpected: " + "; ".join(soak.unexpected[:20])]
    report = "\n".join(lines) + "\n"
    print(report)
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / f"soak-{datetime.date.today()}-cpu.md").write_text(report)
    sys.exit(0 if all(checks.values()) else 1)


if __name__ == "__main__":
    main()
