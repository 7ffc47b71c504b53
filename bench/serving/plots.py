"""One PNG per run: a row per scenario, three panels each.

1. output tok/s against the number of concurrent clients (fixed-concurrency points);
2. TTFT p50/p90/p99 against the output tok/s actually reached (every load point; rate points dashed);
3. ITL p50/p90/p99 against the same.
Colours are targets, line styles percentiles (p50 solid, p90 dashed, p99 dotted), markers the load mode
(circles: fixed concurrency, squares: Poisson rate); latency axes are logarithmic.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt
from matplotlib.lines import Line2D

PERCENTILE_STYLE = {"p50": "-", "p90": "--", "p99": ":"}
MODE_MARKER = {"concurrency": "o", "rate": "s"}


def _series(results: dict, target: str, scenario: str, mode: str) -> list[dict]:
    runs = [r for r in results["runs"] if (r["target"], r["scenario"], r["mode"]) == (target, scenario, mode)]
    return sorted(runs, key=lambda r: r["value"])


def _failed_targets(results: dict, scenario: str) -> list[str]:
    """'name (error kinds)' of targets none of whose requests in `scenario` succeeded."""
    failed = []
    for t in results["targets"]:
        runs = [
            r["summary"] for r in results["runs"] if (r["target"], r["scenario"]) == (t["name"], scenario)
        ]
        if runs and not any(s["completed"] for s in runs):
            kinds = sorted({kind for s in runs for kind in s["errors"]})
            failed.append(f"{t['name']} ({', '.join(kinds) or 'cancelled'})")
    return failed


def _key(colours: dict[str, str]) -> list[Line2D]:
    """Legend entries for the latency panels: targets (colour), percentiles (line style), load mode (marker)."""
    grey = "0.4"
    handles = [Line2D([], [], color=c, label=name) for name, c in colours.items()]
    handles += [Line2D([], [], color=grey, linestyle=style, label=p) for p, style in PERCENTILE_STYLE.items()]
    handles += [
        Line2D([], [], color=grey, marker=m, linestyle="", label=mode) for mode, m in MODE_MARKER.items()
    ]
    return handles


def plot(results: dict, path: Path) -> None:
    scenarios = list(dict.fromkeys(r["scenario"] for r in results["runs"]))
    targets = [t["name"] for t in results["targets"]]
    colours = {name: f"C{i}" for i, name in enumerate(targets)}
    fig, axes = plt.subplots(len(scenarios), 3, figsize=(15, 3.6 * len(scenarios)), squeeze=False)
    for row, scenario in zip(axes, scenarios, strict=True):
        tput, ttft, itl = row
        for target in targets:
            conc = _series(results, target, scenario, "concurrency")  # 0 tok/s where nothing finished
            if conc:
                tput.plot(
                    [r["value"] for r in conc],
                    [r["summary"]["output_throughput"] for r in conc],
                    "o-",
                    color=colours[target],
                    label=target,
                )
            for mode, marker in MODE_MARKER.items():
                runs = [r for r in _series(results, target, scenario, mode) if r["summary"]["completed"]]
                runs.sort(key=lambda r: r["summary"]["output_throughput"])
                x = [r["summary"]["output_throughput"] for r in runs]
                for ax, metric in ((ttft, "ttft_ms"), (itl, "itl_ms")):
                    for p, line in PERCENTILE_STYLE.items():
                        y = [r["summary"][metric][p] if r["summary"][metric] else float("nan") for r in runs]
                        if runs:
                            label = f"{target} {p}" + (" (rate)" if mode == "rate" else "")
                            ax.plot(
                                x,
                                y,
                                marker=marker,
                                linestyle=line,
                                color=colours[target],
                                label=label,
                                markersize=4,
                            )
        tput.set(xlabel="concurrent clients", ylabel="output tok/s", title=f"{scenario}: throughput")
        tput.set_xscale("log", base=2)
        tput.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        failed = _failed_targets(results, scenario)
        if failed:
            tput.text(
                0.02,
                0.02,
                "no successful request: " + "; ".join(failed),
                transform=tput.transAxes,
                fontsize=8,
            )
        ttft.set(
            xscale="log",
            yscale="log",
            xlabel="output tok/s",
            ylabel="TTFT ms",
            title=f"{scenario}: time to first token",
        )
        itl.set(
            xscale="log",
            yscale="log",
            xlabel="output tok/s",
            ylabel="ITL ms",
            title=f"{scenario}: inter-token latency",
        )
        for ax in row:
            ax.grid(True, which="both", alpha=0.3)
        if tput.has_data():
            tput.legend(fontsize=7)
        ttft.legend(handles=_key(colours), fontsize=7, ncol=2)
    fig.suptitle(f"Serving benchmark {results['date']} — {results['hardware']}", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.98))
    fig.savefig(path, dpi=80)
    plt.close(fig)
