"""Everything GPU-related in one prepared run: correctness in bf16 on CUDA, then speed against the rooflines.

    python bench/gpu_check.py [--out DIR] [--quick] [--only engine_tiny,gpu_tests,engine,profile_decode]

Needs torch with CUDA, transformers and timm (for the reference), and the Llama 3 tokenizer file from the
llama-models wheel: install that wheel *outside* the import path (it also ships a top-level `models` package),
e.g. `pip install --no-deps --target "$(python -c 'import sys;print(sys.prefix)')/llama-models" llama-models`.

Each section is independent (a failure is printed and the next section runs) and appends rows to one table,
printed at the end and written to DIR/gpu-check-<date>.md (default bench/results/). Rooflines: performance.md
(P = 790 TFLOP/s bf16, BW = 4.3 TB/s on the H200).
"""

from __future__ import annotations

import argparse
import datetime
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
import source_tree  # bench/ is first on sys.path when a script here runs

source_tree.ensure_importable()

PEAK_TFLOPS = 790.0
PEAK_TBPS = 4.3
Row = dict


def timed(fn, warmup: int = 2, iters: int = 5) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / iters


def section_calibration(rows: list[Row], quick: bool) -> None:
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    s = timed(lambda: a @ a)
    rows.append({"check": "bf16 GEMM 8192^3", "value": f"{2 * 8192**3 / s / 1e12:.0f} TFLOP/s", "ref": "790"})
    x = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    s = timed(lambda: x.clone())
    rows.append({"check": "device copy 1 GiB", "value": f"{2 * 2**30 / s / 1e12:.2f} TB/s", "ref": "4.3"})


def section_models(rows: list[Row], quick: bool) -> None:
    from bench import gpu_models

    gpu_models.run(rows)


def section_vision(rows: list[Row], quick: bool) -> None:
    from plm_serve.models import PLMConfig, build_model

    for preset, tflop_per_tile in (("plm-1b", 0.706), ("plm-8b", 3.910)):
        cfg = PLMConfig.from_preset(preset)
        model = build_model(cfg, device="cuda", dtype=torch.bfloat16, init="random")
        for tiles in (37, 74):
            px = torch.randint(0, 256, (tiles, 3, 448, 448), dtype=torch.uint8, device="cuda")
            with torch.inference_mode():
                s = timed(lambda m=model, px=px: m.encode_media(m.normalize_pixels(px)), warmup=1, iters=3)
            rate = tiles / s
            bound = PEAK_TFLOPS / tflop_per_tile
            rows.append(
                {
                    "check": f"vision {preset} tower+projector, {tiles} tiles",
                    "value": f"{rate:.0f} tiles/s ({100 * rate / bound:.0f}% of roofline)",
                    "ref": f"{bound:.0f} tiles/s bound",
                }
            )
        del model
        torch.cuda.empty_cache()


def _random_checkpoint(preset: str, folder: Path) -> Path:
    from plm_serve.models import write_random_checkpoint
    from plm_serve.processors import write_processor_files

    write_random_checkpoint(folder, preset=preset, seed=0, dtype=torch.bfloat16)
    write_processor_files(folder)
    return folder


def section_engine(rows: list[Row], quick: bool) -> None:
    """PLM-1B shapes, random weights: our engine vs transformers' generate() on the same checkpoint."""
    from bench.engine_gpu import compare_engine_and_hf

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = _random_checkpoint("plm-1b", Path(tmp) / "plm-1b-random")
        compare_engine_and_hf(ckpt, rows, quick)


def section_engine_tiny(rows: list[Row], quick: bool) -> None:
    """The whole engine on CUDA (bf16) on the tiny reference checkpoint: runs, and agrees with transformers."""
    from plm_serve.engine import EngineConfig, EngineCore
    from tests import reference
    from tests.engine import engine_fixtures as fx

    ckpt = reference.tiny_checkpoint(reference.PE_L)
    prompts = fx.standard_prompts(reference.load_hf_processor(ckpt))
    core = EngineCore.load(EngineConfig(model=str(ckpt), device="cuda", dtype="bfloat16", max_num_seqs=64))
    tokens: dict[str, list[int]] = {}
    for i in range(16):
        req = fx.request(prompts[i % len(prompts)], f"r{i}", max_tokens=12, min_tokens=12)
        core.add_request(req)
        tokens[req.request_id] = []
    t0 = time.perf_counter()
    while core.has_unfinished():
        for out in core.step():
            assert out.error is None, out.error
            tokens[out.request_id].extend(out.token_ids)
    seconds = time.perf_counter() - t0
    core.scheduler.check_integrity()
    hf = reference.load_hf_model(ckpt).to("cuda", torch.bfloat16)
    for p in prompts:
        p.pixel_values = None if p.pixel_values is None else p.pixel_values.to("cuda", torch.bfloat16)
        p.pixel_values_videos = (
            None if p.pixel_values_videos is None else p.pixel_values_videos.to("cuda", torch.bfloat16)
        )
    agree = 0
    for i in range(len(prompts)):
        ids = torch.tensor([prompts[i].input_ids], device="cuda")
        kwargs = {
            k: v
            for k, v in (
                ("pixel_values", prompts[i].pixel_values),
                ("pixel_values_videos", prompts[i].pixel_values_videos),
            )
            if v is not None
        }
        with torch.no_grad():
            out = hf.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                do_sample=False,
                max_new_tokens=12,
                min_new_tokens=12,
                **kwargs,
            )
        agree += out[0, ids.shape[1] :].tolist()[:4] == tokens[f"r{i}"][:4]
    rows.append(
        {
            "check": "engine on CUDA bf16, tiny checkpoint, 16 requests (text/image/video)",
            "value": f"ran in {seconds:.2f}s, KV blocks {core.stats.num_kv_blocks}; first 4 greedy tokens agree with HF bf16 {agree}/{len(prompts)}",
            "ref": "integrity ok",
        }
    )


def section_profile_decode(rows: list[Row], quick: bool) -> None:
    """Where one engine step's time goes at PLM-1B shapes: 64 running decodes, torch profiler top ops."""
    from torch.profiler import ProfilerActivity, profile

    from plm_serve.engine import EngineConfig, EngineCore, EngineRequest, SamplingParams

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = _random_checkpoint("plm-1b", Path(tmp) / "plm-1b-random")
        core = EngineCore.load(EngineConfig(model=str(ckpt), device="cuda", dtype="bfloat16"))
        gen = torch.Generator().manual_seed(0)
        for i in range(64):
            ids = [128000, *torch.randint(1000, 100_000, (511,), generator=gen).tolist()]
            core.add_request(EngineRequest(f"p{i}", ids, SamplingParams(max_tokens=64, min_tokens=64)))
        while core.stats.num_steps < 6:  # prefill and a few decodes
            core.step()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(10):
            core.step()
        torch.cuda.synchronize()
        step_ms = (time.perf_counter() - t0) / 10 * 1e3
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                core.step()
            torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=20))
        print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=20))
        events = prof.key_averages()
        cuda_ms = sum(e.self_device_time_total for e in events) / 3 / 1e3
        launches = sum(e.count for e in events if e.key.startswith("cudaLaunchKernel")) / 3
        rows.append(
            {
                "check": "decode step, PLM-1B shapes, 64 sequences at ctx ~520",
                "value": f"{step_ms:.1f} ms/step wall, {cuda_ms:.1f} ms GPU kernels, {launches:.0f} launches/step",
                "ref": "1.07 ms floor at B=32, ctx 2048 (performance.md)",
            }
        )


def section_preprocess(rows: list[Row], quick: bool) -> None:
    from bench import preprocess

    if hasattr(preprocess, "gpu_rows"):
        preprocess.gpu_rows(rows)
    else:
        rows.append(
            {"check": "preprocess on CUDA", "value": "no gpu_rows() in bench/preprocess.py", "ref": ""}
        )


def section_gpu_tests(rows: list[Row], quick: bool) -> None:
    """The pytest tests marked `gpu` (skipped on CPU-only CI)."""
    import subprocess

    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-m",
            "gpu",
            "tests/models",
            "tests/engine",
            "tests/processors",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    print(proc.stdout[-4000:], proc.stderr[-2000:])
    last = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else "no output"
    rows.append(
        {"check": "pytest -m gpu", "value": last, "ref": "exit 0" if proc.returncode == 0 else "FAILED"}
    )


SECTIONS = [
    section_calibration,
    section_engine_tiny,
    section_gpu_tests,
    section_engine,
    section_profile_decode,
    section_models,
    section_vision,
    section_preprocess,
]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only", default="", help="comma-separated section names")
    args = parser.parse_args()
    assert torch.cuda.is_available(), "needs a CUDA device"
    rows: list[Row] = []
    for section in SECTIONS:
        if args.only and section.__name__.removeprefix("section_") not in args.only.split(","):
            continue
        t0 = time.perf_counter()
        print(f"== {section.__name__}", flush=True)
        try:
            section(rows, args.quick)
        except Exception as exc:
            traceback.print_exc()
            rows.append(
                {"check": section.__name__, "value": f"FAILED: {type(exc).__name__}: {exc}", "ref": ""}
            )
        print(f"   {time.perf_counter() - t0:.1f}s", flush=True)
        torch.cuda.empty_cache()
        write_report(rows, args.out)  # after every section: a run cut short still leaves its table


def write_report(rows: list[Row], out: Path) -> None:
    props = torch.cuda.get_device_properties(0)
    lines = [
        f"# GPU check, {datetime.date.today()}",
        "",
        f"{props.name}, {props.total_memory / 2**30:.0f} GiB, torch {torch.__version__}",
        "",
        "| check | value | reference |",
        "|---|---|---|",
    ]
    lines += [f"| {r['check']} | {r['value']} | {r.get('ref', '')} |" for r in rows]
    report = "\n".join(lines) + "\n"
    print(report, flush=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"gpu-check-{datetime.date.today()}.md").write_text(report)


if __name__ == "__main__":
    main()
