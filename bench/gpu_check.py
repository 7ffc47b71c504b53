"""Everything GPU in one prepared run: diagnosis, decode/prefill/vision against the H200 rooflines, the engine end
to end against transformers' generate(), graph/eager and kernel/reference token identity, memory sizing.

    python bench/gpu_check.py [--out DIR] [--budget-s 420] [--only NAME,NAME] [--skip NAME,NAME]
    python bench/gpu_check.py --dry-run --out /tmp/x   # every section on the CPU with a tiny model (CI runs this)

Models are random-weight bf16 builds of the presets in configs/models/ (plm-1b; plm-8b when time allows), so no
download is needed; prompts are token ids and images random tiles. Runs where the package is not installed
(bench scripts make the source tree importable). Sections run in priority order; one that would not finish
within `--budget-s` is skipped, one that fails is reported and the next runs. The table is printed at the end
and written after every section to DIR/gpu-check-<date>.md (default bench/results/), so a run cut short still
leaves its rows. Kernel microbenchmarks come from bench/gpu_kernels.py when it exists (its `bench_*`
functions return rows). Rooflines: P = 790 TFLOP/s bf16, BW = 4.3 TB/s (the H200 as measured; the calibration
row shows this machine's own figures). Formulas in bench/engine_gpu.py and docs/engine-gpu.md.
"""

from __future__ import annotations

import argparse
import datetime
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
import source_tree  # bench/ is first on sys.path when a script here runs

source_tree.ensure_importable()

from bench import engine_gpu as eg
from plm_serve.models import PLMConfig, build_model, load_model

PEAK_FLOPS = 790e12
PEAK_BW = 4.3e12
Row = dict


@dataclass
class Plan:
    """Sizes of every section: the real ones on the GPU, tiny ones for --dry-run on the CPU."""

    dry_run: bool
    small: str = "plm-1b"
    big: str | None = "plm-8b"
    decode_batches: tuple[int, ...] = (1, 32, 256)
    decode_ctx: int = 2048
    steps: int = 20
    diag: tuple[int, int] = (64, 512)  # batch, context
    e2e: tuple[int, int, int] = (64, 512, 128)  # requests, prompt, output
    identity: tuple[int, int, int] = (32, 128, 32)
    prefill: int = 8192
    vision_tiles: tuple[int, ...] = (36, 74)
    image_tiles: int = 36
    image_out: int = 128
    image_loads: tuple[tuple[int, int], ...] = ((1, 4), (8, 16), (32, 48))  # (concurrency, requests)
    hf_images: tuple[int, int] = (8, 64)  # requests, output tokens
    tradeoff: tuple[int, int] = (16, 24)  # concurrency, requests
    tradeoff_caps: tuple[int | None, ...] = (128, 256, 1024, None)
    profile_steps: int = 3

    @classmethod
    def tiny(cls) -> Plan:
        return cls(
            dry_run=True, small="tiny-demo", big=None, decode_batches=(1, 2), decode_ctx=40, steps=1, diag=(2, 24),
            e2e=(2, 24, 3), identity=(2, 16, 3), prefill=64, vision_tiles=(1,), image_tiles=1, image_out=2,
            image_loads=((1, 1), (2, 2)), hf_images=(2, 2), tradeoff=(2, 2), tradeoff_caps=(128, None),
            profile_steps=1,
        )  # fmt: skip


@dataclass
class Context:
    plan: Plan
    device: torch.device
    dtype: torch.dtype
    tmp: Path
    rows: list[Row] = field(default_factory=list)
    _model: object = None
    _hf: object = None
    _ckpt: Path | None = None

    @property
    def ckpt(self) -> Path:
        """A random-weight checkpoint of the small preset on disk (for transformers), written once."""
        if self._ckpt is None:
            from plm_serve.models import write_random_checkpoint

            self._ckpt = write_random_checkpoint(
                self.tmp / self.plan.small, self.plan.small, seed=0, dtype=self.dtype
            )
        return self._ckpt

    @property
    def model(self):
        """Our model of the small preset, loaded once from that checkpoint and shared by every engine."""
        if self._model is None:
            self._model = load_model(self.ckpt, device=self.device, dtype=self.dtype)
        return self._model

    @property
    def hf(self):
        if self._hf is None:
            from transformers import PerceptionLMForConditionalGeneration

            hf = PerceptionLMForConditionalGeneration.from_pretrained(self.ckpt, dtype=self.dtype)
            self._hf = hf.to(self.device).eval()
        return self._hf

    def drop_hf(self) -> None:
        self._hf = None
        eg.free()

    @property
    def tokenizer(self):
        return eg.bench_tokenizer(self.model.config.text.vocab_size)

    @property
    def shapes(self) -> eg.Shapes:
        return eg.Shapes.of(self.model.config)

    def core(self, **config):
        return eg.make_core(self.model, self.tokenizer, **config)

    def row(self, check: str, value: str, ref: str = "") -> None:
        self.rows.append({"check": check, "value": value, "ref": ref})


def _blocks(batch: int, tokens: int, block_size: int = 16) -> int:
    return batch * -(-(tokens + 1) // block_size) + 16


# ------------------------------------------------------------------------------------------------- sections
def section_calibration(c: Context) -> None:
    n = 8192 if not c.plan.dry_run else 256
    a = torch.randn(n, n, device=c.device, dtype=c.dtype)
    s = _timed(c, lambda: a @ a)
    c.row(f"{c.dtype} GEMM {n}^3", f"{2 * n**3 / s / 1e12:.1f} TFLOP/s", "790 (H200 bf16)")
    x = torch.empty(2**30 if not c.plan.dry_run else 2**24, dtype=torch.uint8, device=c.device)
    s = _timed(c, lambda: x.clone())
    c.row(f"device copy {x.numel() >> 20} MiB", f"{2 * x.numel() / s / 1e12:.2f} TB/s", "4.3 (H200)")


def section_diagnosis(c: Context) -> None:
    """The reference decode path (torch paged attention, eager, synchronous loop) at PLM-1B shapes, batch 64 at a
    ~512 context: (A) as it runs, (B) with cuDNN SDPA disabled, (C) with a frozen context (the same shapes every
    step), plus the profiler's top ops. If (A) >> (B) ~ (C), per-step cuDNN graph rebuilds are the cost."""
    batch, ctx = c.plan.diag
    core = c.core(
        attention_backend="torch", enable_cuda_graphs=False, overlap_scheduling=False, max_num_seqs=batch,
        num_kv_blocks=_blocks(batch, ctx + 4 * c.plan.steps), max_num_batched_tokens=max(16384, batch * ctx),
    )  # fmt: skip
    long_enough = eg.SamplingParams(max_tokens=4 * c.plan.steps + 16, ignore_eos=True)
    for i, ids in enumerate(eg.text_prompts(batch, ctx - 1, seed=3)):
        core.add_request(eg.EngineRequest(f"d{i}", ids, long_enough))
    while any(s.is_prefill for s in core.scheduler.running) or core.scheduler.num_waiting:
        core.step()
    core.step()

    def steps() -> float:
        eg.sync(c.device)
        t0 = time.perf_counter()
        for _ in range(c.plan.steps):
            core.step()
        eg.sync(c.device)
        return (time.perf_counter() - t0) / c.plan.steps * 1e3

    default_ms = steps()
    cudnn = torch.backends.cudnn.version() if c.device.type == "cuda" else None
    c.row(
        f"diag A: reference decode step, default SDPA backend (cuDNN {cudnn}), B={batch} ctx~{ctx}",
        f"{default_ms:.1f} ms/step",
        "",
    )
    if c.device.type == "cuda":
        torch.backends.cuda.enable_cudnn_sdp(False)
        try:
            c.row("diag B: same, cuDNN SDPA disabled", f"{steps():.1f} ms/step", "")
        finally:
            torch.backends.cuda.enable_cudnn_sdp(True)
    c.row(
        "diag (profile): reference decode step",
        _profile(c, core.step, c.plan.profile_steps),
        "top ops printed above",
    )
    ctx_now = core.scheduler.running[0].num_tokens
    frozen = eg.decode_step_seconds(core.runner, batch, ctx_now, c.plan.steps, graphs=False) * 1e3
    c.row(f"diag C: reference decode, frozen context {ctx_now} (runner only)", f"{frozen:.1f} ms/step", "")
    eg.free(core)


def section_decode(c: Context, preset_model=None, label: str = "") -> None:
    """Decode step time at B = 1 / 32 / 256 with 2k contexts, graph replay and eager, beside the KV+weights roofline."""
    model = preset_model or c.model
    batches, ctx = c.plan.decode_batches, c.plan.decode_ctx
    core = eg.make_core(
        model, c.tokenizer, max_num_seqs=max(batches), num_kv_blocks=_blocks(max(batches), ctx)
    )
    core.runner.kv_cache.data.normal_(0, 0.5)  # finite, non-trivial keys and values
    shapes = eg.Shapes.of(model.config)
    name = label or c.plan.small
    graphs = core.runner.graphs is not None
    for b in batches:
        floor = shapes.decode_bytes(b, ctx) / PEAK_BW
        eager = eg.decode_step_seconds(core.runner, b, ctx, c.plan.steps, graphs=False)
        value = f"eager {eager * 1e3:.2f} ms ({b / eager:,.0f} tok/s, {100 * floor / eager:.0f}% of roofline)"
        if graphs:
            g = eg.decode_step_seconds(core.runner, b, ctx, c.plan.steps, graphs=True)
            value = f"graph {g * 1e3:.2f} ms ({b / g:,.0f} tok/s, {100 * floor / g:.0f}%); " + value
        c.row(f"decode {name} B={b} ctx {ctx}", value, f"floor {floor * 1e3:.2f} ms, {b / floor:,.0f} tok/s")
    if not graphs:
        backend = type(core.runner._attention(_probe(core))).__name__
        c.row(f"decode {name}: CUDA graphs", "not captured: eager steps only", f"attention backend {backend}")
    eg.free(core)


def section_e2e_text(c: Context) -> None:
    """64 x 512 -> 128 through the engine (defaults, and with the prefill cap off as an offline batch would run)
    and through transformers' padded generate() on the same requests."""
    n, prompt, out = c.plan.e2e
    requests = [(ids, []) for ids in eg.text_prompts(n, prompt, seed=0)]
    hf_s, hf_tokens = eg.hf_generate(c.hf, requests, out)
    total = n * out
    for label, overrides in (
        ("defaults", {}),
        ("prefill cap off", {"max_prefill_tokens_per_decode_step": None}),
    ):
        core = c.core(max_num_seqs=max(n, 8), num_kv_blocks=_blocks(n, prompt + out), **overrides)
        eg.run_closed_loop(core, requests[:2], 2, 4)  # warm-up
        ours = eg.run_closed_loop(core, requests, n, out)
        eg.free(core)
        agree = sum(ours.tokens[f"r{i}"][:8] == hf_tokens[i][:8] for i in range(n))
        c.row(
            f"e2e text {n} x {prompt}->{out}, engine {label}",
            f"ours {total / ours.seconds:,.0f} out tok/s ({ours.seconds:.2f}s, TTFT p50 {eg.percentile(ours.ttft, 50) * 1e3:.0f} ms, "
            f"ITL p50 {eg.percentile(ours.itl, 50) * 1e3:.2f} ms) vs HF generate {total / hf_s:,.0f} tok/s: {hf_s / ours.seconds:.1f}x",
            f"goal >= 7.5k tok/s and >= 8x; first 8 tokens agree {agree}/{n} (random bf16 weights: near-ties)",
        )


def section_identity(c: Context) -> None:
    """Greedy tokens: graph replay vs eager (same backend), then the default backend vs the torch reference."""
    n, prompt, out = c.plan.identity
    requests = [(ids, []) for ids in eg.text_prompts(n, prompt, seed=5)]
    runs = {}
    for name, config in (
        ("graph", {}), ("eager", {"enable_cuda_graphs": False}),
        ("reference", {"enable_cuda_graphs": False, "attention_backend": "torch"}),
    ):  # fmt: skip
        core = c.core(max_num_seqs=n, num_kv_blocks=_blocks(n, prompt + out), **config)
        runs[name] = (eg.run_closed_loop(core, requests, n, out).tokens, type(core.runner._attention(_probe(core))).__name__,
                      core.runner.graphs is not None)  # fmt: skip
        eg.free(core)
    same = lambda a, b: sum(runs[a][0][k] == runs[b][0][k] for k in runs[a][0])
    c.row(f"identity: graph vs eager ({runs['graph'][1]}, graphs captured: {runs['graph'][2]})",
          f"{same('graph', 'eager')}/{n} sequences identical over {out} tokens", "goal: all")  # fmt: skip
    c.row(f"identity: {runs['eager'][1]} vs {runs['reference'][1]} (eager)",
          f"{same('eager', 'reference')}/{n} sequences identical over {out} tokens", "bf16: near-ties may differ")  # fmt: skip


def _probe(core):
    from plm_serve.engine.cuda_graphs import StaticDecodeInputs

    return StaticDecodeInputs(1, 1, core.runner.device).metadata(1)


def section_profile(c: Context) -> None:
    """One engine decode step with the default settings (graphs, overlap) at B=64, ctx ~512: the profiler table."""
    batch, ctx = c.plan.diag
    core = c.core(max_num_seqs=batch, num_kv_blocks=_blocks(batch, ctx + 64))
    long_enough = eg.SamplingParams(max_tokens=c.plan.steps + c.plan.profile_steps + 16, ignore_eos=True)
    for i, ids in enumerate(eg.text_prompts(batch, ctx - 1, seed=4)):
        core.add_request(eg.EngineRequest(f"p{i}", ids, long_enough))
    for _ in range(6):
        core.step()
    eg.sync(c.device)
    t0 = time.perf_counter()
    for _ in range(c.plan.steps):
        core.step()
    eg.sync(c.device)
    wall = (time.perf_counter() - t0) / c.plan.steps * 1e3
    c.row(
        f"profile: engine decode step, defaults, B={batch} ctx~{ctx}",
        f"{wall:.2f} ms/step wall; " + _profile(c, core.step, c.plan.profile_steps),
        "",
    )
    eg.free(core)


def section_vision(c: Context, preset_model=None, label: str = "") -> None:
    model = preset_model or c.model
    runner = eg.ModelRunner(
        model,
        eg.EngineConfig(model="x", max_encoder_tiles_per_step=max(c.plan.vision_tiles)),
        c.device,
        c.dtype,
    )
    bound = PEAK_FLOPS / eg.Shapes.of(model.config).vision_flops_per_tile
    for tiles in c.plan.vision_tiles:
        s = eg.vision_seconds(runner, tiles)
        c.row(f"vision {label or c.plan.small} tower+projector, {tiles} tiles (bucketed)",
              f"{tiles / s:,.0f} tiles/s ({100 * tiles / s / bound:.0f}% of roofline)", f"{bound:,.0f} tiles/s bound")  # fmt: skip


def section_prefill(c: Context, preset_model=None, label: str = "") -> None:
    model = preset_model or c.model
    n = c.plan.prefill
    core = eg.make_core(
        model, c.tokenizer, max_num_seqs=4, num_kv_blocks=_blocks(1, n), max_num_batched_tokens=max(n, 16384)
    )
    s = eg.prefill_seconds(core.runner, n)
    bound = PEAK_FLOPS / eg.Shapes.of(model.config).prefill_flops_per_token(n)
    c.row(f"prefill {label or c.plan.small}, one {n}-token prompt in one chunk", f"{n / s:,.0f} tok/s ({s * 1e3:.0f} ms, {100 * n / s / bound:.0f}% of bound)",
          f"{bound:,.0f} tok/s bound ({n / bound * 1e3:.0f} ms)")  # fmt: skip
    eg.free(core)


def section_image_chat(c: Context) -> None:
    """One 36-tile image + ~50 words -> 128 tokens, closed loop at several concurrencies; transformers beside it."""
    p = c.plan
    tpt = c.model.config.tokens_per_tile
    total = max(r for _, r in p.image_loads)
    requests = [eg.image_prompt(i, p.image_tiles, tpt) for i in range(total)]
    longest = len(requests[0][0]) + p.image_out
    core = c.core(max_num_seqs=64, num_kv_blocks=_blocks(max(conc for conc, _ in p.image_loads) + 2, longest))
    eg.run_closed_loop(core, [eg.image_prompt(999, p.image_tiles, tpt)], 1, 2)  # warm-up
    for conc, n in p.image_loads:
        st = eg.run_closed_loop(core, requests[:n], conc, p.image_out)
        c.row(f"image chat ({p.image_tiles} tiles, {p.image_out} out), concurrency {conc}, {n} requests",
              f"{n / st.seconds:.2f} req/s, {st.num_tokens / st.seconds:,.0f} out tok/s; TTFT p50 {eg.percentile(st.ttft, 50) * 1e3:.0f} / "
              f"p99 {eg.percentile(st.ttft, 99) * 1e3:.0f} ms; ITL p50 {eg.percentile(st.itl, 50) * 1e3:.2f} / p99 {eg.percentile(st.itl, 99) * 1e3:.2f} ms",
              "PLM-1B bound 14-16 req/s, TTFT floor 62 ms; goals >= 10 req/s, TTFT p50 <= 124 ms at low load")  # fmt: skip
    n, out = p.hf_images
    ours = eg.run_closed_loop(core, requests[:n], n, out)
    eg.free(core)
    hf_s, _ = eg.hf_generate(c.hf, requests[:n], out)
    c.row(f"image chat {n} requests x {out} tokens, all at once", f"ours {n * out / ours.seconds:,.0f} out tok/s ({ours.seconds:.2f}s) vs HF padded generate "
          f"{n * out / hf_s:,.0f} tok/s: {hf_s / ours.seconds:.1f}x", "")  # fmt: skip
    c.drop_hf()


def section_tradeoff(c: Context) -> None:
    """ITL vs TTFT under image arrivals for several `max_prefill_tokens_per_decode_step` settings."""
    p = c.plan
    conc, n = p.tradeoff
    tpt = c.model.config.tokens_per_tile
    requests = [eg.image_prompt(2000 + i, p.image_tiles, tpt) for i in range(n)]
    for cap in p.tradeoff_caps:
        core = c.core(max_num_seqs=64, num_kv_blocks=_blocks(conc + 2, len(requests[0][0]) + p.image_out),
                      max_prefill_tokens_per_decode_step=cap)  # fmt: skip
        st = eg.run_closed_loop(core, requests, conc, p.image_out)
        ratio = eg.percentile(st.itl, 99) / eg.percentile(st.itl, 50)
        c.row(f"prefill cap {cap} while decoding: {n} image chats at concurrency {conc}",
              f"ITL p50 {eg.percentile(st.itl, 50) * 1e3:.2f} / p99 {eg.percentile(st.itl, 99) * 1e3:.2f} ms ({ratio:.1f}x); "
              f"TTFT p50 {eg.percentile(st.ttft, 50) * 1e3:.0f} ms; {n / st.seconds:.2f} req/s", "goal: ITL p99 <= 2x steady")  # fmt: skip
        eg.free(core)


def section_kv_sizing(c: Context) -> None:
    """The profiled KV pool (gpu_memory_utilization 0.9, graphs captured) under the largest vision batch and a full
    token budget: no out-of-memory, peak memory within the budget."""
    if c.device.type != "cuda":
        c.row("kv sizing", "skipped: profiling needs CUDA", "")
        return
    core = c.core()  # defaults: the pool sized by profiling
    total = torch.cuda.get_device_properties(c.device).total_memory
    runner = core.runner
    tpt = c.model.config.tokens_per_tile
    torch.cuda.reset_peak_memory_stats(c.device)
    for i in range(2):  # two maximal images: the encoder budget of one step
        ids, media = eg.image_prompt(3000 + i, 37, tpt)
        core.add_request(
            eg.EngineRequest(f"img{i}", ids, eg.SamplingParams(max_tokens=8, min_tokens=8), media)
        )
    long = eg.text_prompts(1, core.max_model_len - 64, seed=9)[0]
    core.add_request(eg.EngineRequest("long", long, eg.SamplingParams(max_tokens=8, min_tokens=8)))
    for i, ids in enumerate(eg.text_prompts(200, 64, seed=10)):
        core.add_request(eg.EngineRequest(f"t{i}", ids, eg.SamplingParams(max_tokens=32, min_tokens=32)))
    steps = 0
    while core.has_unfinished():
        for out in core.step():
            assert out.error is None, out.error
        steps += 1
    peak = torch.cuda.max_memory_reserved(c.device)
    c.row("kv sizing: profiled pool, 2 x 37-tile images + an 11.4k prompt + 200 decodes",
          f"{core.stats.num_kv_blocks:,} blocks; no OOM in {steps} steps; peak reserved {peak / 2**30:.1f} GiB of {total / 2**30:.0f} GiB "
          f"({100 * peak / total:.0f}%); decode graphs took {runner.graph_memory / 2**30:.2f} GiB (reserved {runner.graph_reserve / 2**30:.2f})",
          "budget: 90% of the device")  # fmt: skip
    eg.free(core)


def section_plm8b(c: Context) -> None:
    if c.plan.big is None:
        return
    model = build_model(
        PLMConfig.from_preset(c.plan.big), device=c.device, dtype=c.dtype, init="random", seed=0
    )
    section_vision(c, model, c.plan.big)
    section_prefill(c, model, c.plan.big)
    section_decode(c, model, c.plan.big)
    eg.free(model)


def section_kernels(c: Context) -> None:
    try:
        from bench import gpu_kernels
    except ImportError:
        c.row("kernel microbenchmarks", "bench/gpu_kernels.py not present", "")
        return
    for name in sorted(n for n in dir(gpu_kernels) if n.startswith("bench_")):
        c.rows.extend(getattr(gpu_kernels, name)())


def section_gpu_tests(c: Context) -> None:
    """The pytest tests marked `gpu` (skipped on CPU-only CI)."""
    import subprocess

    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "tests/models", "tests/engine", "tests/processors"],
        cwd=ROOT, capture_output=True, text=True,
    )  # fmt: skip
    print(proc.stdout[-4000:], proc.stderr[-2000:])
    last = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else "no output"
    c.row("pytest -m gpu", last, "exit 0" if proc.returncode == 0 else "FAILED")


# (section, seconds it takes on an H200 (estimate), runs in --dry-run)
SECTIONS: list[tuple[Callable[[Context], None], float, bool]] = [
    (section_calibration, 5, True),
    (section_diagnosis, 30, True),
    (section_decode, 25, True),
    (section_e2e_text, 30, True),
    (section_identity, 20, True),
    (section_profile, 10, True),
    (section_vision, 10, True),
    (section_prefill, 5, True),
    (section_image_chat, 45, True),
    (section_kv_sizing, 30, False),
    (section_plm8b, 60, False),
    (section_tradeoff, 40, True),
    (section_kernels, 40, False),
    (section_gpu_tests, 60, False),
]


# ------------------------------------------------------------------------------------------------- helpers
def _timed(c: Context, fn, warmup: int = 2, iters: int = 5) -> float:
    for _ in range(warmup):
        fn()
    eg.sync(c.device)
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    eg.sync(c.device)
    return (time.perf_counter() - t0) / iters


def _profile(c: Context, step: Callable[[], object], steps: int) -> str:
    """Profile `steps` calls of `step`: print the top ops, return device time and launches per step."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if c.device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        eg.sync(c.device)
    events = prof.key_averages()
    sort = "cuda_time_total" if c.device.type == "cuda" else "cpu_time_total"
    print(events.table(sort_by=sort, row_limit=15))
    device_ms = sum(e.self_device_time_total for e in events) / steps / 1e3
    launches = (
        sum(
            e.count
            for e in events
            if e.key.startswith(("cudaLaunchKernel", "cuLaunchKernel", "cudaGraphLaunch"))
        )
        / steps
    )
    top = sorted(events, key=lambda e: -e.self_device_time_total)[:3] if c.device.type == "cuda" else []
    names = ", ".join(f"{e.key[:40]} {e.self_device_time_total / steps / 1e3:.2f} ms" for e in top)
    return f"{device_ms:.2f} ms device time, {launches:.0f} launches per step" + (
        f"; top: {names}" if names else ""
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--budget-s", type=float, default=420.0, help="skip sections that would end later")
    parser.add_argument("--only", default="", help="comma-separated section names (without section_)")
    parser.add_argument("--skip", default="", help="comma-separated section names to leave out")
    parser.add_argument("--dry-run", action="store_true", help="every section on the CPU with a tiny model")
    args = parser.parse_args()
    if args.dry_run:
        plan, device, dtype = Plan.tiny(), torch.device("cpu"), torch.float32
    else:
        assert torch.cuda.is_available(), "needs a CUDA device (or --dry-run)"
        plan, device, dtype = Plan(dry_run=False), torch.device("cuda"), torch.bfloat16
    only = {s for s in args.only.split(",") if s}
    skip = {s for s in args.skip.split(",") if s}
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        c = Context(plan, device, dtype, Path(tmp))
        for section, estimate, in_dry_run in SECTIONS:
            name = section.__name__.removeprefix("section_")
            if (only and name not in only) or name in skip or (plan.dry_run and not in_dry_run):
                continue
            elapsed = time.perf_counter() - t_start
            if not plan.dry_run and elapsed + estimate > args.budget_s:
                c.row(
                    name,
                    f"skipped: {elapsed:.0f}s elapsed + ~{estimate:.0f}s would pass the {args.budget_s:.0f}s budget",
                    "",
                )
                continue
            print(f"== {name}", flush=True)
            t0 = time.perf_counter()
            try:
                section(c)
            except Exception as exc:
                traceback.print_exc()
                c.row(name, f"FAILED: {type(exc).__name__}: {exc}", "")
            print(f"   {time.perf_counter() - t0:.1f}s", flush=True)
            eg.free()
            write_report(c, args.out, time.perf_counter() - t_start)


def write_report(c: Context, out: Path, seconds: float) -> Path:
    if c.device.type == "cuda":
        props = torch.cuda.get_device_properties(c.device)
        machine = f"{props.name}, {props.total_memory / 2**30:.0f} GiB"
    else:
        machine = "CPU (dry run: tiny model, tiny sizes; the numbers mean nothing)"
    lines = [
        f"# GPU check, {datetime.date.today()}",
        "",
        f"{machine}, torch {torch.__version__}; `python bench/gpu_check.py{' --dry-run' if c.plan.dry_run else ''}`, {seconds:.0f} s",
        "",
        "| check | value | reference |",
        "|---|---|---|",
    ]
    lines += [f"| {r['check']} | {r['value']} | {r.get('ref', '')} |" for r in c.rows]
    report = "\n".join(lines) + "\n"
    print(report, flush=True)
    out.mkdir(parents=True, exist_ok=True)
    suffix = "-dryrun" if c.plan.dry_run else ""
    path = out / f"gpu-check-{datetime.date.today()}{suffix}.md"
    path.write_text(report)
    return path


if __name__ == "__main__":
    main()
