"""The results of a run: one JSON document, and the markdown file with the ratio table and every run.

Results JSON: {"date", "label", "hardware", "command", "notes", "plan": Plan.as_dict(), "targets": [...],
"runs": [{"target", "scenario", "mode", "value", "label", "summary": metrics.summarize(...)}]}.
The ratio table puts every target next to the baseline target, per scenario and load point: throughput
ratios (> 1: the target is faster), latency as "target / baseline" in ms.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from bench.machine import cpu_model


def hardware(device: str) -> str:
    """CPU model and core count of this machine, plus the GPU when the servers run on one."""
    model = cpu_model()
    text = f"CPU: {model}, {os.cpu_count()} cores"
    if device.startswith("cuda"):
        import torch

        text += f"; GPU: {torch.cuda.get_device_name()}"
    return text


def file_stem(date: str, label: str) -> str:
    return f"serving-{date}-{label}"


def write_json(results: dict, path: Path) -> None:
    path.write_text(json.dumps(results, indent=1, sort_keys=False) + "\n")


def _runs_by_key(results: dict) -> dict[tuple[str, str, str, float], dict]:
    return {(r["target"], r["scenario"], r["mode"], r["value"]): r["summary"] for r in results["runs"]}


def _fmt(value: float | None, digits: int = 1) -> str:
    if value is None:
        return "—"
    return f"{value:.{digits}f}" if abs(value) < 1000 else f"{value:.0f}"


def _pct(summary: dict, metric: str, p: str) -> float | None:
    stats = summary.get(metric)
    return None if stats is None else stats[p]


def _ratio(a: float | None, b: float | None) -> str:
    if not a or not b:
        return "—"
    return f"{a / b:.2f}x"


def _errors(summary: dict) -> str:
    parts = [f"{n} {kind}" for kind, n in summary["errors"].items()]
    if summary["cancelled"]:
        parts.append(f"{summary['cancelled']} cancelled")
    if summary.get("unsent"):
        parts.append(f"{summary['unsent']} unsent")
    return ", ".join(parts) or "0"


def points(results: dict) -> list[tuple[str, str, float, str]]:
    """(scenario, mode, value, label) of every load point, in run order."""
    seen: dict[tuple[str, str, float], str] = {}
    for r in results["runs"]:
        seen.setdefault((r["scenario"], r["mode"], r["value"]), r["label"])
    return [(s, m, v, label) for (s, m, v), label in seen.items()]


def ratio_table(results: dict, baseline: str) -> str:
    """Markdown: every other target against `baseline`, one row per (target, scenario, load point)."""
    runs = _runs_by_key(results)
    others = [t["name"] for t in results["targets"] if t["name"] != baseline]
    lines = [
        "| target vs baseline | scenario | load | req/s | output tok/s | throughput ratio | TTFT p50 ms "
        "| TTFT p99 ms | ITL p50 ms | TPOT p99 ms | prompt tok/req | server CPU s/req | errors |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for other in others:
        for scenario, mode, value, label in points(results):
            a, b = runs.get((other, scenario, mode, value)), runs.get((baseline, scenario, mode, value))
            if a is None or b is None:
                continue

            def pair(get, digits=1, a=a, b=b) -> str:
                return f"{_fmt(get(a), digits)} / {_fmt(get(b), digits)}"

            lines.append(
                f"| {other} vs {baseline} | {scenario} | {label} "
                f"| {pair(lambda s: s['request_throughput'], 2)} | {pair(lambda s: s['output_throughput'])} "
                f"| {_ratio(a['output_throughput'], b['output_throughput'])} "
                f"| {pair(lambda s: _pct(s, 'ttft_ms', 'p50'))} | {pair(lambda s: _pct(s, 'ttft_ms', 'p99'))} "
                f"| {pair(lambda s: _pct(s, 'itl_ms', 'p50'))} | {pair(lambda s: _pct(s, 'tpot_ms', 'p99'))} "
                f"| {pair(lambda s: s['mean_prompt_tokens'], 0)} "
                f"| {pair(lambda s: s.get('server_cpu_s_per_request'), 2)} | {_errors(a)} / {_errors(b)} |"
            )
    return "\n".join(lines)


def runs_table(results: dict) -> str:
    """Markdown: every run with the full set of metrics."""
    head = (
        "| target | scenario | load | done | req/s | out tok/s | TTFT p50/p90/p99 ms | TPOT p50/p90/p99 ms "
        "| ITL p50/p90/p99 ms | E2E p50 ms | prompt / out tok per req | server CPU s per req | short replies "
        "| errors |"
    )
    lines = [head, "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results["runs"]:
        s = r["summary"]

        def three(metric: str, s=s) -> str:
            return "/".join(_fmt(_pct(s, metric, p)) for p in ("p50", "p90", "p99"))

        lines.append(
            f"| {r['target']} | {r['scenario']} | {r['label']} | {s['completed']}/{s['requests']} "
            f"| {s['request_throughput']:.2f} | {s['output_throughput']:.1f} | {three('ttft_ms')} "
            f"| {three('tpot_ms')} | {three('itl_ms')} | {_fmt(_pct(s, 'e2e_ms', 'p50'))} "
            f"| {_fmt(s['mean_prompt_tokens'], 0)} / {_fmt(s['mean_output_tokens'], 0)} "
            f"| {_fmt(s.get('server_cpu_s_per_request'), 2)} | {s['short_replies']} "
            f"| {_errors(s)} |"
        )
    return "\n".join(lines)


def plan_table(plan: dict) -> str:
    """Markdown: what each scenario sent (a `Plan.as_dict()`)."""
    w = plan["workload"]
    lines = [
        f"Plan (seed {plan['seed']}): images {w['image_width']}x{w['image_height']} JPEG, videos "
        f"{w['video_frames']} frames of {w['video_width']}x{w['video_height']}, text-chat replies capped at "
        f"{w['max_output_tokens']} tokens, media replies {w['media_output_tokens']} tokens.",
        "",
        "| scenario | requests per point | load points | warm-up | sending window + grace per point |",
        "|---|---|---|---|---|",
    ]
    for sp in plan["scenarios"]:
        loads = ", ".join(
            f"c={int(p['value'])}" if p["mode"] == "concurrency" else f"{p['value']:g} req/s"
            for p in sp["points"]
        )
        limit = f"{sp['duration_s']:g} s + {sp['grace_s']:g} s" if sp["duration_s"] else "no limit"
        lines.append(f"| {sp['name']} | {sp['num_requests']} | {loads} | {sp['warmup']} | {limit} |")
    return "\n".join(lines)


def markdown(results: dict, baseline: str | None, plot_name: str | None) -> str:
    out = [f"# Serving benchmark, {results['date']}", ""]
    out += [f"Machine: {results['hardware']}.", ""]
    out += [f"- {note}" for note in results["notes"]]
    out += ["", f"Command: `{results['command']}`", "", "Targets:"]
    for t in results["targets"]:
        line = f"- **{t['name']}** `{t['url']}`, model `{t['model']}`; exact lengths via {t['flavor_fields']}"
        out.append(line)
        out += [f"  - server log: {n}" for n in t.get("notes", [])]
    out += ["", plan_table(results["plan"]), ""]
    out.append(
        "Greedy, streamed. Each load point has its own requests (the same for every target), so no point is "
        "served from caches an earlier one filled. Throughput counts successful requests over the point's elapsed "
        "time; latencies are of successful requests (definitions in `bench/serving/metrics.py`)."
    )
    if baseline and len(results["targets"]) > 1:
        out += [
            "",
            f"## Side by side (value pairs are target / {baseline})",
            "",
            ratio_table(results, baseline),
        ]
    if plot_name:
        out += ["", f"![throughput and latency]({plot_name})"]
    out += ["", "## Every run", "", runs_table(results), ""]
    return "\n".join(out)
