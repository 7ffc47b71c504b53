"""Run a plan against one or more targets, side by side: the same requests, target after target per load point.

Targets take turns at each load point (rather than one whole sweep after the other) so that slow drift of a
shared machine spreads over all of them. Every load point gets its own request set (same for every target),
so no point is served from caches warmed by an earlier one; warm-up requests are separate again.
"""

from __future__ import annotations

import asyncio
import zlib
from collections.abc import Callable

from bench.serving.client import Target
from bench.serving.flavors import FLAVORS
from bench.serving.load import run_point, warm_up
from bench.serving.metrics import summarize
from bench.serving.plan import Plan
from bench.serving.workload import build_requests


def stable_seed(*parts: object) -> int:
    return zlib.crc32("/".join(map(str, parts)).encode())


def _line(target: str, scenario: str, label: str, s: dict) -> str:
    ttft = s["ttft_ms"]["p50"] if s["ttft_ms"] else float("nan")
    itl = s["itl_ms"]["p50"] if s["itl_ms"] else float("nan")
    errors = sum(s["errors"].values())
    return (
        f"{target:>14} {scenario:>13} {label:>10}: {s['completed']:>4}/{s['requests']:<4} ok "
        f"{s['request_throughput']:7.2f} req/s {s['output_throughput']:8.1f} tok/s  TTFT p50 {ttft:8.1f} ms  "
        f"ITL p50 {itl:7.1f} ms  errors {errors} cancelled {s['cancelled']} unsent {s['unsent']}"
    )


async def run_plan(
    targets: list[Target],
    plan: Plan,
    *,
    progress: bool = True,
    log: Callable[[str], None] = print,
    transports: dict | None = None,
) -> dict:
    """{"targets": [...], "runs": [...]} for every (scenario, load point, target) of `plan`."""
    clients = {t.name: t.http_client((transports or {}).get(t.name)) for t in targets}
    runs = []
    try:
        for t in targets:
            await t.resolve_model(clients[t.name])
        for sp in plan.scenarios:
            warm = build_requests(
                sp.name, sp.warmup, plan.workload, stable_seed(plan.seed, sp.name, "warm-up")
            )
            for t in targets:
                failed = [r for r in await warm_up(clients[t.name], t, warm) if not r.ok]
                if failed:
                    log(
                        f"{t.name} {sp.name}: {len(failed)}/{len(warm)} warm-up requests failed: {failed[0].error}"
                    )
            for i, point in enumerate(sp.points):
                seed = stable_seed(plan.seed, sp.name, i)
                specs = build_requests(sp.name, sp.num_requests, plan.workload, seed)
                for t in targets:
                    cpu_before = t.cpu_clock() if t.cpu_clock else None
                    run = await run_point(
                        clients[t.name],
                        t,
                        specs,
                        point,
                        seed=seed,
                        duration_s=sp.duration_s,
                        grace_s=sp.grace_s,
                        progress=progress,
                        desc=f"{t.name} {sp.name} {point.label}",
                    )
                    summary = summarize(run.results, run.elapsed_s, run.unsent, run.cancelled)
                    if cpu_before is not None:
                        # the server's own CPU time: work per request, whatever else shares the machine
                        cpu = t.cpu_clock() - cpu_before
                        summary["server_cpu_s"] = cpu
                        summary["server_cpu_s_per_request"] = (
                            cpu / summary["completed"] if summary["completed"] else None
                        )
                    log(_line(t.name, sp.name, point.label, summary))
                    runs.append(
                        {
                            "target": t.name,
                            "scenario": sp.name,
                            "mode": point.mode,
                            "value": point.value,
                            "label": point.label,
                            "summary": summary,
                        }
                    )
    finally:
        for http in clients.values():
            await http.aclose()
    described = [
        {
            "name": t.name,
            "url": t.url,
            "flavor": t.flavor,
            "flavor_fields": FLAVORS[t.flavor],
            "model": t.model,
        }
        for t in targets
    ]
    return {"targets": described, "runs": runs}


def run_plan_sync(targets: list[Target], plan: Plan, **kwargs) -> dict:
    return asyncio.run(run_plan(targets, plan, **kwargs))
