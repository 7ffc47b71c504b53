"""Load patterns: a fixed number of concurrent clients, or a fixed request rate with Poisson arrivals.

One load point sends a fixed request list and ends when every request has answered, or at `duration_s` (then
requests still running are cancelled and counted as such, not as errors, and the point's time is the deadline).
Arrival times of a rate point come from a seeded generator, so every server sees the same schedule.
"""

from __future__ import annotations

import asyncio
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
    results: list[RequestResult]
    elapsed_s: float  # first send to last answer (or to the deadline)
    cancelled: int  # requests still running at the deadline, or never sent before it


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
    progress: bool = True,
    desc: str = "",
) -> PointRun:
    bar = tqdm(total=len(specs), desc=desc or point.label, leave=False, disable=not progress, unit="req")
    results: list[RequestResult] = []

    async def one(spec: RequestSpec) -> None:
        results.append(await send(http, target, spec))
        bar.update(1)

    start = time.perf_counter()
    if point.mode == "concurrency":
        queue = iter(specs)

        async def client() -> None:
            for spec in queue:  # the shared iterator hands each request to exactly one client
                await one(spec)

        tasks = [asyncio.create_task(client()) for _ in range(int(point.value))]
    elif point.mode == "rate":
        tasks = []
        for offset, spec in zip(poisson_arrivals(point.value, len(specs), seed), specs, strict=True):
            await asyncio.sleep(max(0.0, start + offset - time.perf_counter()))
            if duration_s is not None and time.perf_counter() - start >= duration_s:
                break
            tasks.append(asyncio.create_task(one(spec)))
    else:
        raise ValueError(f"unknown load mode {point.mode!r}")
    remaining = None if duration_s is None else max(0.0, start + duration_s - time.perf_counter())
    done, pending = await asyncio.wait(tasks, timeout=remaining) if tasks else (set(), set())
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    for task in done:
        task.result()  # a bug in the benchmark itself must not pass silently
    elapsed = time.perf_counter() - start
    if duration_s is not None:
        elapsed = min(elapsed, duration_s)
    bar.close()
    return PointRun(results, elapsed, cancelled=len(specs) - len(results))


async def warm_up(http: httpx.AsyncClient, target: Target, specs: list[RequestSpec]) -> list[RequestResult]:
    """Send `specs` (not measured) a few at a time: loads lazy code paths, compiles, fills allocator pools."""
    results: list[RequestResult] = []
    for i in range(0, len(specs), 4):
        results += await asyncio.gather(*(send(http, target, s) for s in specs[i : i + 4]))
    return results
