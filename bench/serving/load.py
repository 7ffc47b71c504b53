"""Load patterns: a fixed number of concurrent clients, or a fixed request rate with Poisson arrivals.

One load point sends a fixed request list and ends when every request has answered. A time limit closes the
sending window after `duration_s` and cancels what still runs `grace_s` later; neither the unsent nor the
cancelled requests count as errors, and the point's time runs to its last answer.
Arrival times of a rate point come from a seeded generator, so every server sees the same schedule.
"""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass

import httpx
import numpy as np
from tqdm import tqdm

from bench.serving.client import RequestResult, Target, send
from bench.serving.workload import RequestSpec


@dataclass(frozen=True)
class LoadPoint:
    mode: str  # "concurrency" | "rate"
    value: float  # clients, or requests per second

    @property
    def label(self) -> str:
        return f"c={int(self.value)}" if self.mode == "concurrency" else f"{self.value:g} req/s"


@dataclass
class PointRun:
    results: list[RequestResult]  # one per request sent and answered (successfully or not)
    elapsed_s: float  # first send to last answer
    unsent: int  # requests not sent before the point's sending window closed
    cancelled: int  # requests sent but still running at the end of the grace period


def poisson_arrivals(rate: float, n: int, seed: int) -> np.ndarray:
    """Send offsets in seconds of `n` requests at `rate` per second: cumulative exponential gaps, first at 0."""
    gaps = np.random.default_rng(seed).exponential(1.0 / rate, size=n)
    return np.concatenate([[0.0], np.cumsum(gaps[:-1])])


async def run_point(
    http: httpx.AsyncClient,
    target: Target,
    specs: list[RequestSpec],
    point: LoadPoint,
    *,
    seed: int = 0,
    duration_s: float | None = None,
    grace_s: float = 30.0,
    progress: bool = True,
    desc: str = "",
) -> PointRun:
    """Send `specs` at `point`'s load. With `duration_s`, nothing is sent after that many seconds, and what is
    still running `grace_s` later is cancelled (aiperf's benchmark duration and grace period)."""
    bar = tqdm(total=len(specs), desc=desc or point.label, leave=False, disable=not progress, unit="req")
    results: list[RequestResult] = []
    sent = 0
    start = time.perf_counter()
    close = math.inf if duration_s is None else start + duration_s

    async def one(spec: RequestSpec) -> None:
        nonlocal sent
        sent += 1
        results.append(await send(http, target, spec))
        bar.update(1)

    if point.mode == "concurrency":
        queue = iter(specs)

        async def client() -> None:
            # the shared iterator hands each request to exactly one client
            while time.perf_counter() < close and (spec := next(queue, None)) is not None:
                await one(spec)

        tasks = [asyncio.create_task(client()) for _ in range(int(point.value))]
    elif point.mode == "rate":
        tasks = []
        for offset, spec in zip(poisson_arrivals(point.value, len(specs), seed), specs, strict=True):
            if start + offset >= close:
                break
            await asyncio.sleep(max(0.0, start + offset - time.perf_counter()))
            tasks.append(asyncio.create_task(one(spec)))
    else:
        raise ValueError(f"unknown load mode {point.mode!r}")
    timeout = None if math.isinf(close) else max(0.0, close + grace_s - time.perf_counter())
    done, pending = await asyncio.wait(tasks, timeout=timeout) if tasks else (set(), set())
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    for task in done:
        task.result()  # a bug in the benchmark itself must not pass silently
    elapsed = time.perf_counter() - start
    bar.close()
    return PointRun(results, elapsed, unsent=len(specs) - sent, cancelled=sent - len(results))


async def warm_up(http: httpx.AsyncClient, target: Target, specs: list[RequestSpec]) -> list[RequestResult]:
    """Send `specs` (not measured) a few at a time: loads lazy code paths, compiles, fills allocator pools."""
    results: list[RequestResult] = []
    for i in range(0, len(specs), 4):
        results += await asyncio.gather(*(send(http, target, s) for s in specs[i : i + 4]))
    return results
