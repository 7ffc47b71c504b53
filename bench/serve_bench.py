"""Serving benchmark: load through the OpenAI API, fixed concurrency and Poisson rates, side by side.

    python bench/serve_bench.py scenarios                     # the named workloads
    python bench/serve_bench.py compare --plan cpu            # plm-serve vs `transformers serve`, started here
    python bench/serve_bench.py compare --plan gpu --random-model plm-1b --device cuda --dtype bfloat16
    python bench/serve_bench.py run --target http://127.0.0.1:8000 --scenario image-low --concurrency 1,8
    python bench/serve_bench.py run --target URL,name=a --target URL2,name=b,flavor=openai,model=M --plan cpu
    python bench/serve_bench.py report bench/results/serving-DATE-LABEL.json   # table and plot again

`run` measures any OpenAI-compatible servers that are already up (local or remote); `compare` first starts
plm-serve and `transformers serve --continuous-batching` on 127.0.0.1 with the same checkpoint (default: the
demo checkpoint `plm-serve` serves without `--model`). Traffic goes only to the given or started URLs; every
image and video is inline. Writes serving-DATE-LABEL.{json,md,png} to --out-dir and prints one line per point.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shlex
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench import source_tree

source_tree.ensure_importable()

from bench.serving import plan as plans
from bench.serving import report
from bench.serving.client import Target
from bench.serving.flavors import FLAVORS
from bench.serving.runner import run_plan_sync
from bench.serving.workload import SCENARIOS

ROOT = Path(__file__).resolve().parents[1]
SHARED_NOTE = "The machine was shared with other jobs while this ran: expect run-to-run noise."
SHARED_GPU_FRACTION = 0.5


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def _size(text: str) -> tuple[int, int]:
    match = re.fullmatch(r"(\d+)x(\d+)", text)
    if not match:
        raise argparse.ArgumentTypeError(f"{text!r}: expected WIDTHxHEIGHT")
    return int(match.group(1)), int(match.group(2))


def parse_target(text: str, index: int, api_key: str | None, timeout_s: float) -> Target:
    """`URL[,name=N][,flavor=F][,model=M]` -> Target."""
    url, *fields = text.split(",")
    options = {}
    for field in fields:
        key, sep, value = field.partition("=")
        if not sep or key not in ("name", "flavor", "model"):
            raise SystemExit(f"--target {text!r}: expected URL[,name=N][,flavor=F][,model=M]")
        options[key] = value
    return Target(
        options.get("name", f"target{index}"),
        url,
        options.get("flavor", "vllm"),
        options.get("model"),
        api_key=api_key,
        request_timeout_s=timeout_s,
    )


def add_plan_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("what to measure (flags override the plan's defaults)")
    g.add_argument("--plan", help=f"plan file or shipped plan ({', '.join(plans.shipped_plans())})")
    g.add_argument(
        "--scenario",
        action="append",
        help="scenario(s) to run, comma-separated (default: the plan's, else text-chat)",
    )
    g.add_argument("--concurrency", type=_floats, help="fixed concurrency points, e.g. 1,4,16")
    g.add_argument("--rate", type=_floats, help="Poisson request rates per second, e.g. 1,4")
    g.add_argument("--num-requests", type=int, help="requests per load point")
    g.add_argument("--warmup", type=int, help="unmeasured requests per target and scenario")
    g.add_argument(
        "--duration-s",
        type=float,
        help="sending window per load point (default: until every request is sent)",
    )
    g.add_argument(
        "--grace-s", type=float, help="after the window, how long running requests may finish (default 30)"
    )
    g.add_argument("--seed", type=int, default=0)
    w = p.add_argument_group("workload")
    w.add_argument("--image-size", type=_size, help="WIDTHxHEIGHT of generated images (default 640x480)")
    w.add_argument("--video-frames", type=int, help="frames per generated video (default 8)")
    w.add_argument("--video-size", type=_size, help="WIDTHxHEIGHT of generated videos (default 320x240)")
    w.add_argument("--max-output-tokens", type=int, help="cap on text-chat reply lengths (default 256)")
    w.add_argument("--media-output-tokens", type=int, help="reply length of media scenarios (default 64)")
    w.add_argument("--repeat-pool", type=int, help="distinct images image-repeat cycles through (default 2)")
    w.add_argument("--images-per-request", type=int, help="images per multi-image request (default 3)")
    o = p.add_argument_group("output")
    o.add_argument("--out-dir", type=Path, default=ROOT / "bench" / "results")
    o.add_argument("--label", help="file label after the date (default: cpu / the GPU's name / run)")
    o.add_argument("--baseline", help="target the others are compared with (default: the last one)")
    o.add_argument("--note", action="append", default=[], help="a line for the results file (repeatable)")
    o.add_argument("--no-plot", action="store_true")
    o.add_argument("--no-progress", action="store_true")
    o.add_argument("--request-timeout-s", type=float, default=600.0)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="serve_bench.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("scenarios", help="list the named workload scenarios")
    run = sub.add_parser("run", help="measure servers that are already running, at the given URLs")
    run.add_argument(
        "--target",
        action="append",
        required=True,
        help=f"URL[,name=N][,flavor=F][,model=M] (repeatable); flavors: {', '.join(FLAVORS)} (default vllm); "
        "model: default the first of GET /v1/models",
    )
    run.add_argument("--api-key", help="sent as 'Authorization: Bearer KEY' to every target")
    add_plan_flags(run)
    cmp = sub.add_parser("compare", help="start plm-serve and `transformers serve` here, measure both")
    src = cmp.add_mutually_exclusive_group()
    src.add_argument("--model", type=Path, help="checkpoint folder (default: plm-serve's demo checkpoint)")
    src.add_argument(
        "--random-model", help="build a random-weight checkpoint of a shipped shape (plm-1b, plm-3b, plm-8b)"
    )
    cmp.add_argument("--device", default="cpu", help="cpu or cuda (both servers)")
    cmp.add_argument("--dtype", default="float32", help="float32 or bfloat16 (both servers)")
    cmp.add_argument("--plm-serve-args", default="", help="extra plm-serve flags, one shell-quoted string")
    cmp.add_argument("--transformers-args", default="", help="extra `transformers serve` flags")
    cmp.add_argument("--log-dir", type=Path, help="server logs (default: a temporary folder)")
    cmp.add_argument("--startup-timeout-s", type=float, default=900.0)
    add_plan_flags(cmp)
    rep = sub.add_parser("report", help="write the markdown table and the plot again from a results JSON")
    rep.add_argument("results", type=Path)
    rep.add_argument("--baseline")
    rep.add_argument("--note", action="append", default=[], help="a line to add to the results' notes")
    rep.add_argument("--no-plot", action="store_true")
    return parser


def plan_from_args(args: argparse.Namespace) -> plans.Plan:
    raw = plans.read_plan(args.plan) if args.plan else {"scenarios": {"text-chat": {}}}
    only = [s for group in args.scenario or [] for s in group.split(",") if s] or None
    overrides = {
        key: value
        for key, value in {
            "concurrency": args.concurrency,
            "rate": args.rate,
            "num_requests": args.num_requests,
            "warmup": args.warmup,
            "duration_s": args.duration_s,
            "grace_s": args.grace_s,
        }.items()
        if value is not None
    }
    if args.concurrency is not None and args.rate is None:
        overrides["rate"] = []  # points given on the command line replace the plan's, not add to them
    if args.rate is not None and args.concurrency is None:
        overrides["concurrency"] = []
    workload = {
        "max_output_tokens": args.max_output_tokens,
        "media_output_tokens": args.media_output_tokens,
        "video_frames": args.video_frames,
        "repeat_pool": args.repeat_pool,
        "images_per_request": args.images_per_request,
    }
    if args.image_size:
        workload["image_width"], workload["image_height"] = args.image_size
    if args.video_size:
        workload["video_width"], workload["video_height"] = args.video_size
    workload = {k: v for k, v in workload.items() if v is not None}
    return plans.build_plan(raw, only=only, overrides=overrides, workload_overrides=workload, seed=args.seed)


def random_checkpoint(preset: str, dtype: str) -> Path:
    """A random-weight checkpoint of `preset` with the PLM processor files, cached under ~/.cache/plm-serve."""
    import torch

    from plm_serve.models import write_random_checkpoint
    from plm_serve.processors import write_processor_files

    folder = Path.home() / ".cache" / "plm-serve" / f"bench-random-{preset}-{dtype}"
    if not (folder / ".complete").exists():
        print(f"building a random-weight {preset} checkpoint in {folder}", file=sys.stderr)
        write_random_checkpoint(folder, preset=preset, seed=0, dtype=getattr(torch, dtype))
        write_processor_files(folder)
        (folder / ".complete").write_text("ok\n")
    return folder


def demo_checkpoint() -> Path:
    from plm_serve.server.demo import ensure_demo_checkpoint
    from plm_serve.server.version import VERSION

    return ensure_demo_checkpoint(Path.home() / ".cache" / "plm-serve", VERSION)


def default_label(device: str) -> str:
    if not device.startswith("cuda"):
        return "cpu"
    import torch

    name = torch.cuda.get_device_name().lower()
    match = re.search(r"\b([a-z]\d{2,4}[a-z]?)\b", name)  # "NVIDIA H200" -> "h200"
    return match.group(1) if match else "cuda"


def write_outputs(results: dict, stem: Path, baseline: str | None, plot: bool) -> list[Path]:
    """STEM.json, STEM.png (unless not `plot`) and STEM.md; prints the ratio table."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = [stem.with_suffix(".json")]
    report.write_json(results, paths[0])
    plot_name = None
    if plot:
        from bench.serving.plots import plot as draw

        draw(results, stem.with_suffix(".png"))
        paths.append(stem.with_suffix(".png"))
        plot_name = paths[-1].name
    baseline = baseline or results["targets"][-1]["name"]
    paths.append(stem.with_suffix(".md"))
    paths[-1].write_text(report.markdown(results, baseline, plot_name))
    if len(results["targets"]) > 1:
        print(report.ratio_table(results, baseline))
    return paths


def measure(args: argparse.Namespace, targets: list[Target], device: str, notes: list[str]) -> dict:
    plan = plan_from_args(args)
    load_before = os.getloadavg()[0]
    measured = run_plan_sync(targets, plan, progress=not args.no_progress)
    load = f"1-minute load average {load_before:.1f} before the run, {os.getloadavg()[0]:.1f} after"
    command = "python bench/serve_bench.py " + " ".join(shlex.quote(a) for a in args.argv)
    return {
        "date": datetime.date.today().isoformat(),
        "label": args.label or (default_label(device) if args.command == "compare" else "run"),
        "hardware": report.hardware(device),
        "command": command,
        "notes": [*notes, f"{load.capitalize()} (this machine).", *args.note],
        "plan": plan.as_dict(),
        **measured,
    }


def cmd_compare(args: argparse.Namespace) -> dict:
    from bench.serving import servers

    if args.random_model:
        model = random_checkpoint(args.random_model, args.dtype)
    else:
        model = args.model or demo_checkpoint()
    log_dir = args.log_dir or Path(tempfile.mkdtemp(prefix="serve-bench-logs-"))
    plm_args = shlex.split(args.plm_serve_args)
    notes = [f"Checkpoint: `{model.name}` ({args.device}, {args.dtype}), the same folder for both servers."]
    if args.device.startswith("cuda") and "--gpu-memory-utilization" not in plm_args:
        # plm-serve sizes its KV pool from free GPU memory; leave room for the other server on the same GPU
        plm_args += ["--gpu-memory-utilization", str(SHARED_GPU_FRACTION)]
        notes.append(
            f"plm-serve was given --gpu-memory-utilization {SHARED_GPU_FRACTION}: both servers share the GPU."
        )
    started = [
        servers.plm_serve(model, args.device, args.dtype, log_dir, plm_args),
        servers.transformers_serve(
            model, args.device, args.dtype, log_dir, shlex.split(args.transformers_args)
        ),
    ]
    for s in started:
        s.startup_timeout_s = args.startup_timeout_s
    if args.device == "cpu":
        notes.append(SHARED_NOTE)
    entered = []
    try:
        for s in started:
            print(f"starting {s.name}: {' '.join(s.argv)}", file=sys.stderr)
            entered.append(s.__enter__())
        results = measure(args, [s.target(args.request_timeout_s) for s in started], args.device, notes)
    finally:
        for s in reversed(entered):
            s.__exit__(None, None, None)
    for t, s in zip(results["targets"], started, strict=True):
        t["notes"] = s.notes()
        t["url"] = "127.0.0.1 (started by the benchmark)"
    print(f"server logs: {log_dir}", file=sys.stderr)
    return results


def cmd_run(args: argparse.Namespace) -> dict:
    targets = [parse_target(t, i, args.api_key, args.request_timeout_s) for i, t in enumerate(args.target)]
    if len({t.name for t in targets}) != len(targets):
        raise SystemExit("--target names must differ (add ,name=...)")
    note = "Servers measured at the URLs above; the machine line is the benchmark client's."
    return measure(args, targets, "cpu", [note])


def main(argv: list[str] | None = None) -> list[Path]:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    args.argv = argv
    if args.command == "scenarios":
        for s in SCENARIOS.values():
            print(f"{s.name:14} {s.summary}")
        return []
    if args.command == "report":
        results = json.loads(args.results.read_text())
        results["notes"] += args.note
        paths = write_outputs(results, args.results.with_suffix(""), args.baseline, not args.no_plot)
    else:
        results = cmd_compare(args) if args.command == "compare" else cmd_run(args)
        stem = args.out_dir / report.file_stem(results["date"], results["label"])
        paths = write_outputs(results, stem, args.baseline, not args.no_plot)
    for path in paths:
        print(f"wrote {path}")
    return paths


if __name__ == "__main__":
    main()
