"""Microbenchmarks of the Triton kernels and fused decoder ops, beside their rooflines (H200: 4.3 TB/s copy
bandwidth, 790 TFLOP/s bf16).

    python bench/gpu_kernels.py [--device cuda|cpu] [--tiny] [--sweep] [--only decode,prefill,fused,layer]

Sections (each appends rows to one table, printed and written to DIR/gpu-kernels-<date>-<device>.md):
- decode: `paged_decode` for one layer at B = 1 / 32 / 256 with 2k contexts, PLM-1B and PLM-8B shapes, over
  scattered blocks; time, achieved KV bandwidth and its fraction of the roofline (the kernel must read every
  context token's K and V once), the torch reference (gather + SDPA) beside it, and the bf16 error against an
  fp32 reference. `--sweep` adds tile-size / warp-count variants at B = 1 and 256.
- prefill: `paged_prefill` for a 2k-token chunk over a cached 8k prefix (the continuation of a long image
  prompt) and an 8k prompt without prefix, TFLOP/s against the bf16 peak, the torch reference, bf16 error.
- graph: the decode kernels captured in a CUDA graph and replayed after contexts and block tables changed in
  place (equal to an eager call; skipped without CUDA).
- fused: RMSNorm, residual-add + RMSNorm and silu*mul, Triton kernel vs the torch definition, at decode and
  prefill token counts; RoPE + K/V store vs the torch ops, and whether bf16 results are bit-identical.
- layer: one decoder layer's decode step at B = 256, ctx 2048 (1B shape): the full fast path (Triton attention,
  fused RoPE/store, fused norms) against the torch path, with the number of CUDA kernels each launches.

On the GPU the default shapes should run in one to two minutes (Triton compiles each kernel variant once, 1-3 s
each; about 25 variants).
`--device cpu --tiny` runs every section on tiny shapes through Triton's interpreter (set automatically), to
check the harness without a GPU; its timings mean nothing. `run(rows, device, tiny, sweep, only)` is the entry
point for other scripts; rows are dicts with "check", "value", "ref" (and numbers under other keys).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import functools
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if __package__ in (None, ""):  # run as a script: bench/ is on sys.path
    import source_tree
else:
    from bench import source_tree
source_tree.ensure_importable()

BANDWIDTH = 4.3e12  # B/s, measured device copy bandwidth of the H200
PEAK_FLOPS = 790e12  # bf16 dense matmul, measured
BLOCK_SIZE = 16
Row = dict


@dataclass(frozen=True)
class Shape:
    """The attention / MLP shape of one decoder layer."""

    name: str
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden: int
    intermediate: int


def preset_shape(preset: str) -> Shape:
    from plm_serve.models import PLMConfig

    t = PLMConfig.from_preset(preset).text
    return Shape(
        preset, t.num_attention_heads, t.num_key_value_heads, t.head_dim, t.hidden_size, t.intermediate_size
    )


TINY = (Shape("tiny-g4-d64", 8, 2, 64, 128, 256), Shape("tiny-g3-d32", 6, 2, 32, 96, 192))


@dataclass(frozen=True)
class Sizes:
    """What each section runs: full sizes on the GPU, tiny ones in the interpreter."""

    shapes: tuple[Shape, ...]
    decode_batches: tuple[int, ...]
    decode_context: int
    prefill_cases: tuple[tuple[int, int], ...]  # (cached prefix, chunk tokens)
    norm_tokens: tuple[int, ...]
    layer_batch: int
    layer_context: int
    warmup: int
    iters: int
    num_sms: int | None  # what the split count is chosen for; None: ask the device


FULL = Sizes((), (1, 32, 256), 2048, ((8192, 2048), (0, 8192)), (256, 8192), 256, 2048, 3, 20, None)
SMALL = Sizes(TINY, (1, 3), 40, ((50, 20), (0, 24)), (4,), 3, 40, 0, 1, 2)  # S = 2 or 1: quick to interpret


def sizes_for(tiny: bool) -> Sizes:
    if tiny:
        return SMALL
    return dataclasses.replace(FULL, shapes=(preset_shape("plm-1b"), preset_shape("plm-8b")))


# ------------------------------------------------------------------------------------------------ arithmetic
def kv_bytes(batch: int, context: int, shape: Shape, itemsize: int = 2) -> int:
    """Bytes of K and V one layer's decode must read: every context token of every sequence, once."""
    return batch * context * 2 * shape.num_kv_heads * shape.head_dim * itemsize


def attention_flops(cached: int, chunk: int, shape: Shape) -> int:
    """FLOPs of causal attention for `chunk` query tokens after `cached` ones (QK^T and PV, 2 each per MAC)."""
    visible = chunk * cached + chunk * (chunk + 1) // 2  # sum over query tokens of the keys each sees
    return 4 * shape.num_heads * shape.head_dim * visible


def roofline_seconds(nbytes: int = 0, flops: int = 0) -> float:
    return max(nbytes / BANDWIDTH, flops / PEAK_FLOPS)


# ----------------------------------------------------------------------------------------------------- setup
def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn: Callable[[], object], device: str, warmup: int, iters: int) -> float:
    """Seconds per call, averaged over `iters` after `warmup` calls (the first call compiles the kernel)."""
    for _ in range(max(warmup, 1 if device.startswith("cuda") else 0)):
        fn()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    _sync(device)
    return (time.perf_counter() - t0) / iters


@dataclass
class PagedLayer:
    """One layer's pool with every sequence's context in scattered blocks, and the step's metadata."""

    cache: object  # KVCache
    meta: object  # AttentionMetadata
    q: torch.Tensor  # [T, Hq, D]


def paged_layer(
    shape: Shape, seqs: list[tuple[int, int]], device: str, dtype: torch.dtype, seed: int = 0
) -> PagedLayer:
    """seqs: (context length, query tokens) per sequence; the pool is random and already holds all of it."""
    from plm_serve.engine.attention import AttentionMetadata, KVCache

    gen = torch.Generator(device=device).manual_seed(seed)
    need = [-(-ctx // BLOCK_SIZE) for ctx, _ in seqs]
    num_blocks = sum(need) + 1
    cache = KVCache.allocate(1, num_blocks, BLOCK_SIZE, shape.num_kv_heads, shape.head_dim, dtype, device)
    cache.data.normal_(generator=gen)
    perm = torch.randperm(num_blocks, generator=gen, device=device).to(torch.int32)
    width = max(need)
    tables = torch.zeros(len(seqs), width, dtype=torch.int32, device=device)
    start = 0
    for i, n in enumerate(need):
        tables[i, :n] = perm[start : start + n]
        start += n
    query_lens = [q for _, q in seqs]
    context = [c for c, _ in seqs]
    pos = torch.cat([torch.arange(c - q, c, device=device) for c, q in seqs])
    owner = torch.repeat_interleave(
        torch.arange(len(seqs), device=device), torch.tensor(query_lens, device=device)
    )
    slots = tables[owner, pos // BLOCK_SIZE].long() * BLOCK_SIZE + pos % BLOCK_SIZE
    starts = torch.tensor([0, *torch.tensor(query_lens).cumsum(0).tolist()], dtype=torch.int32, device=device)
    meta = AttentionMetadata(
        slot_mapping=slots,
        block_tables=tables,
        context_lens=torch.tensor(context, device=device),
        query_lens=query_lens,
        context_lens_host=context,
        query_start=starts,
        max_query_len=max(query_lens),
    )
    q = torch.randn(sum(query_lens), shape.num_heads, shape.head_dim, generator=gen, device=device).to(dtype)
    return PagedLayer(cache, meta, q)


def _rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.double(), want.double()
    return float((got - want).norm() / want.norm().clamp_min(1e-30))


def _fp32_copy(layer: PagedLayer) -> PagedLayer:
    from plm_serve.engine.attention import KVCache

    return PagedLayer(KVCache(layer.cache.data.float()), layer.meta, layer.q.float())  # type: ignore[attr-defined]


def _torch_reference(layer: PagedLayer) -> torch.Tensor:
    """The torch backend's attention over the pool (the step's K/V already there: rewritten in place)."""
    from plm_serve.engine.attention import TorchPagedAttention

    keys, values = layer.cache.keys(0), layer.cache.values(0)  # type: ignore[attr-defined]
    k, v = keys[layer.meta.slot_mapping], values[layer.meta.slot_mapping]  # type: ignore[attr-defined]
    return TorchPagedAttention(layer.cache, layer.meta)(0, layer.q, k, v)  # type: ignore[arg-type]


# -------------------------------------------------------------------------------------------------- sections
def section_decode(rows: list[Row], device: str, sizes: Sizes, sweep: bool) -> None:
    from plm_serve.engine.attention.paged_decode import choose_num_splits, paged_decode
    from plm_serve.engine.attention.triton_paged import _num_sms

    num_sms = sizes.num_sms or _num_sms(torch.device(device))
    for shape in sizes.shapes:
        for batch in sizes.decode_batches:
            ctx = sizes.decode_context
            layer = paged_layer(shape, [(ctx, 1)] * batch, device, torch.bfloat16)
            m = layer.meta
            keys, values = layer.cache.data[0, 0], layer.cache.data[0, 1]  # type: ignore[attr-defined]
            splits = choose_num_splits(batch, shape.num_kv_heads, num_sms)
            nbytes = kv_bytes(batch, ctx, shape)
            bound = roofline_seconds(nbytes)
            variants = [(64, 4)]  # (tokens per tile, warps): the defaults first
            if sweep and batch in (1, 256):
                variants += [(32, 4), (64, 8), (128, 4), (128, 8)]
            out = None
            for block_n, warps in variants:
                run = functools.partial(
                    paged_decode, layer.q, keys, values, m.block_tables, m.context_lens, splits,
                    block_n=block_n, num_warps=warps,
                )  # fmt: skip
                s = timed(run, device, sizes.warmup, sizes.iters)
                out = run() if out is None else out
                rows.append(
                    {
                        "check": f"decode {shape.name} B={batch} ctx={ctx} S={splits} tile={block_n} warps={warps}",
                        "value": f"{s * 1e3:.3f} ms/layer, {nbytes / s / 1e12:.2f} TB/s "
                        f"({100 * bound / s:.0f}% of roofline)",
                        "ref": f"{bound * 1e3:.3f} ms at 4.3 TB/s",
                        "seconds": s,
                        "roofline_fraction": bound / s,
                    }
                )
            reference = functools.partial(_torch_reference, layer)
            s_ref = timed(reference, device, sizes.warmup, max(1, sizes.iters // 4))
            err = _rel_err(out, _torch_reference(_fp32_copy(layer)))  # type: ignore[arg-type]
            rows.append(
                {
                    "check": f"decode {shape.name} B={batch}: torch reference; bf16 error of the kernel",
                    "value": f"{s_ref * 1e3:.3f} ms/layer; rel. error {err:.2e} vs fp32",
                    "ref": "error <= 1e-2",
                    "seconds": s_ref,
                    "rel_error": err,
                }
            )
            del layer, out
            if device.startswith("cuda"):
                torch.cuda.empty_cache()


def section_prefill(rows: list[Row], device: str, sizes: Sizes, sweep: bool) -> None:
    from plm_serve.engine.attention.paged_prefill import paged_prefill

    for shape in sizes.shapes:
        for cached, chunk in sizes.prefill_cases:
            layer = paged_layer(shape, [(cached + chunk, chunk)], device, torch.bfloat16)
            m = layer.meta
            keys, values = layer.cache.data[0, 0], layer.cache.data[0, 1]  # type: ignore[attr-defined]
            run = functools.partial(
                paged_prefill, layer.q, keys, values, m.block_tables, m.context_lens, m.query_start,
                max_query_len=m.max_query_len,
            )  # fmt: skip
            iters = max(1, sizes.iters // 4)
            s = timed(run, device, sizes.warmup, iters)
            s_ref = timed(functools.partial(_torch_reference, layer), device, sizes.warmup, iters)
            flops = attention_flops(cached, chunk, shape)
            bound = roofline_seconds(flops=flops)
            err = _rel_err(run(), _torch_reference(_fp32_copy(layer)))
            rows.append(
                {
                    "check": f"prefill {shape.name}: {chunk} tokens over {cached} cached",
                    "value": f"{s * 1e3:.2f} ms/layer, {flops / s / 1e12:.0f} TFLOP/s ({100 * bound / s:.0f}% "
                    f"of peak); torch {s_ref * 1e3:.2f} ms; rel. error {err:.2e}",
                    "ref": f"{bound * 1e3:.2f} ms at 790 TFLOP/s",
                    "seconds": s,
                    "reference_seconds": s_ref,
                    "rel_error": err,
                }
            )
            del layer


def section_fused(rows: list[Row], device: str, sizes: Sizes, sweep: bool) -> None:
    from plm_serve.models import fused_ops, triton_ops

    gen = torch.Generator(device=device).manual_seed(0)
    p = functools.partial
    for shape in sizes.shapes:
        for tokens in sizes.norm_tokens:
            x, res = (
                torch.randn(tokens, shape.hidden, generator=gen, device=device).bfloat16() for _ in range(2)
            )
            w = torch.randn(shape.hidden, generator=gen, device=device).bfloat16()
            gate_up = torch.randn(tokens, 2 * shape.intermediate, generator=gen, device=device).bfloat16()
            cases = [  # (name, the kernel, the torch definition, bytes the op must move)
                ("add + RMSNorm", p(triton_ops.add_rms_norm, x, res, w, 1e-5),
                 p(fused_ops.add_rms_norm_reference, x, res, w, 1e-5), 4 * x.nbytes + w.nbytes),
                ("RMSNorm", p(triton_ops.rms_norm, x, w, 1e-5),
                 p(fused_ops.rms_norm_reference, x, w, 1e-5), 2 * x.nbytes + w.nbytes),
                ("silu * mul", p(triton_ops.silu_mul, gate_up),
                 p(fused_ops.silu_mul_reference, gate_up), gate_up.nbytes * 3 // 2),
            ]  # fmt: skip
            for name, fused, reference, nbytes in cases:
                s = timed(fused, device, sizes.warmup, sizes.iters)
                s_ref = timed(reference, device, sizes.warmup, sizes.iters)
                got, want = fused(), reference()
                got, want = (got[0], want[0]) if isinstance(got, tuple) else (got, want)
                rows.append(
                    {
                        "check": f"{name} {shape.name} T={tokens}",
                        "value": f"{s * 1e6:.1f} us fused vs {s_ref * 1e6:.1f} us torch; "
                        f"max |diff| {float((got.float() - want.float()).abs().max()):.1e}",
                        "ref": f"{roofline_seconds(nbytes) * 1e6:.1f} us at 4.3 TB/s",
                        "seconds": s,
                        "reference_seconds": s_ref,
                    }
                )
        rows.append(_rope_store_row(shape, device, sizes))


def _rope_store_row(shape: Shape, device: str, sizes: Sizes) -> Row:
    """RoPE of q and k + the K/V write for one decode step (T = layer_batch rows), kernel vs torch ops."""
    from plm_serve.engine.attention import KVCache
    from plm_serve.engine.attention.kv_store import store_kv
    from plm_serve.models.rope import apply_rotate_half

    t, hq, hkv, d = sizes.layer_batch, shape.num_heads, shape.num_kv_heads, shape.head_dim
    gen = torch.Generator(device=device).manual_seed(1)
    qkv = torch.randn(t, (hq + 2 * hkv) * d, generator=gen, device=device).bfloat16()
    q, k, v = qkv.split([hq * d, hkv * d, hkv * d], dim=-1)
    q, k, v = q.view(t, hq, d), k.view(t, hkv, d), v.view(t, hkv, d)
    angles = 100 * torch.rand(t, 1, d // 2, generator=gen, device=device)
    cos, sin = (f(torch.cat([angles, angles], -1)).bfloat16() for f in (torch.cos, torch.sin))
    pools = [
        KVCache.allocate(1, -(-t // BLOCK_SIZE), BLOCK_SIZE, hkv, d, torch.bfloat16, device) for _ in "ab"
    ]
    slots = torch.randperm(pools[0].num_blocks * BLOCK_SIZE, generator=gen, device=device)[:t]

    def kernel() -> torch.Tensor:
        data = pools[0].data
        return store_kv(k, v, data[0, 0], data[0, 1], slots, q=q, cos=cos, sin=sin)  # type: ignore[return-value]

    def reference() -> torch.Tensor:
        pools[1].keys(0)[slots] = apply_rotate_half(k, cos, sin)
        pools[1].values(0)[slots] = v
        return apply_rotate_half(q, cos, sin)

    s, s_ref = (
        timed(kernel, device, sizes.warmup, sizes.iters),
        timed(reference, device, sizes.warmup, sizes.iters),
    )
    exact = torch.equal(kernel(), reference()) and torch.equal(pools[0].data, pools[1].data)
    return {
        "check": f"RoPE + K/V store {shape.name} T={t}",
        "value": f"{s * 1e6:.1f} us fused vs {s_ref * 1e6:.1f} us torch; bf16 bit-identical: {exact}",
        "ref": "bit-identical on a GPU (the interpreter truncates casts)",
        "seconds": s,
        "reference_seconds": s_ref,
        "exact": exact,
    }


def section_graph(rows: list[Row], device: str, sizes: Sizes, sweep: bool) -> None:
    """Decode attention captured in a CUDA graph, replayed after the contexts and block tables changed in place:
    it must equal an eager call on the new values (the kernels read nothing on the host)."""
    if not device.startswith("cuda"):
        rows.append({"check": "decode in a CUDA graph", "value": "skipped: needs CUDA", "ref": ""})
        return
    from plm_serve.engine.attention.paged_decode import DecodeWorkspace, paged_decode

    shape = sizes.shapes[0]
    b, ctx = 32, sizes.decode_context
    layer = paged_layer(shape, [(ctx, 1)] * b, device, torch.bfloat16)
    m = layer.meta
    keys, values = layer.cache.data[0, 0], layer.cache.data[0, 1]  # type: ignore[attr-defined]
    workspace = DecodeWorkspace.allocate(b, shape.num_heads, 4, shape.head_dim, torch.device(device))
    out = torch.empty_like(layer.q)
    call = functools.partial(
        paged_decode, layer.q, keys, values, m.block_tables, m.context_lens, 4, out=out, workspace=workspace
    )
    call()  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        call()
    gen = torch.Generator(device=device).manual_seed(2)
    new_ctx = torch.randint(0, ctx + 1, (b,), generator=gen, device=device)  # includes 0: padding rows
    m.context_lens.copy_(new_ctx)  # type: ignore[attr-defined]
    m.block_tables.copy_(m.block_tables.flip(0))  # type: ignore[attr-defined]
    graph.replay()
    torch.cuda.synchronize()
    replayed = out.clone()
    eager = paged_decode(layer.q, keys, values, m.block_tables, m.context_lens, 4)  # type: ignore[attr-defined]
    ok = torch.equal(replayed, eager)
    rows.append(
        {
            "check": f"decode {shape.name} B={b} S=4 in a CUDA graph, replayed with new contexts and tables",
            "value": f"equal to eager: {ok}",
            "ref": "True",
            "exact": ok,
        }
    )


def count_cuda_kernels(fn: Callable[[], object]) -> int | str:
    """CUDA kernels (and memcpy/memset) one call of `fn` launches, counted by the profiler ("n/a" off CUDA)."""
    if not torch.cuda.is_available():
        return "n/a"
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


def section_layer(rows: list[Row], device: str, sizes: Sizes, sweep: bool) -> None:
    """One decoder layer of a decode step; the step's attention object is built once, as all layers share it."""
    from plm_serve.engine.attention import make_attention
    from plm_serve.engine.attention.paged_decode import choose_num_splits
    from plm_serve.engine.attention.triton_paged import _num_sms
    from plm_serve.models import fused_ops
    from plm_serve.models.config import TextConfig
    from plm_serve.models.llama import LlamaDecoderLayer
    from plm_serve.models.rope import LlamaRotaryEmbedding

    shape = sizes.shapes[0]
    cfg = TextConfig(
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=1,
        num_attention_heads=shape.num_heads,
        num_key_value_heads=shape.num_kv_heads,
        head_dim=shape.head_dim,
        rope_theta=5e5,
    )
    layer = LlamaDecoderLayer(cfg, 0).to(device=device, dtype=torch.bfloat16).eval()
    gen = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0.0, 0.02, generator=gen) if p.dim() > 1 else p.fill_(1.0)
    b, ctx = sizes.layer_batch, sizes.layer_context
    splits = choose_num_splits(b, shape.num_kv_heads, sizes.num_sms or _num_sms(torch.device(device)))
    paged = paged_layer(shape, [(ctx, 1)] * b, device, torch.bfloat16)
    cos, sin = LlamaRotaryEmbedding(cfg).to(device)(torch.full((b,), ctx - 1, device=device), torch.bfloat16)
    x = (0.1 * torch.randn(b, shape.hidden, generator=gen, device=device)).bfloat16()
    residual = torch.randn(b, shape.hidden, generator=gen, device=device).bfloat16()
    weight_bytes = sum(p.numel() * p.element_size() for p in layer.parameters())
    bound = roofline_seconds(kv_bytes(b, ctx, shape) + weight_bytes)
    outputs = {}
    for label, backend, mode in (("fast path", "triton", "triton"), ("torch path", "torch", "torch")):
        # "triton" mode: the fused ops' kernels for every tensor (on the CPU: the interpreter)
        with torch.inference_mode(), fused_ops.kernel_mode(mode):
            attention = make_attention(paged.cache, paged.meta, backend=backend, num_splits=splits)  # type: ignore[arg-type]
            run = functools.partial(layer, x, residual, cos, sin, attention)
            s = timed(run, device, sizes.warmup, sizes.iters)
            outputs[label] = run()[0]
            kernels = count_cuda_kernels(run)
        rows.append(
            {
                "check": f"decoder layer {shape.name} B={b} ctx={ctx}: {label}",
                "value": f"{s * 1e3:.3f} ms/layer ({100 * bound / s:.0f}% of roofline), {kernels} CUDA kernels",
                "ref": f"{bound * 1e3:.3f} ms at 4.3 TB/s (weights + KV)",
                "seconds": s,
                "kernels": kernels,
            }
        )
    # Both bf16 paths against the torch path in fp32 (its own copy of the layer and the pool).
    from plm_serve.engine.attention import KVCache

    layer32 = copy.deepcopy(layer).float()
    pool32 = KVCache(paged.cache.data.float())  # type: ignore[attr-defined]
    with torch.inference_mode(), fused_ops.kernel_mode("torch"):
        attention = make_attention(pool32, paged.meta, backend="torch")  # type: ignore[arg-type]
        want = layer32(x.float(), residual.float(), cos.float(), sin.float(), attention)[0]
    errors = {label: _rel_err(out, want) for label, out in outputs.items()}
    rows.append(
        {
            "check": f"decoder layer {shape.name}: bf16 error against the fp32 torch path",
            "value": ", ".join(f"{label} {err:.2e}" for label, err in errors.items()),
            "ref": "fast path within ~1.5x of the torch path's",
            **{f"rel_error {label}": err for label, err in errors.items()},
        }
    )


SECTIONS = {
    "decode": section_decode,
    "graph": section_graph,
    "prefill": section_prefill,
    "fused": section_fused,
    "layer": section_layer,
}


def run(
    rows: list[Row],
    device: str = "cuda",
    tiny: bool = False,
    sweep: bool = False,
    only: list[str] | None = None,
) -> list[Row]:
    """Run the sections (all, or `only`), appending rows; a section that fails adds a FAILED row."""
    sizes = sizes_for(tiny)
    for name, section in SECTIONS.items():
        if only and name not in only:
            continue
        t0 = time.perf_counter()
        try:
            section(rows, device, sizes, sweep)
        except Exception as exc:  # one broken section must not hide the others' numbers
            rows.append(
                {"check": f"gpu_kernels.{name}", "value": f"FAILED: {type(exc).__name__}: {exc}", "ref": ""}
            )
        print(f"   {name}: {time.perf_counter() - t0:.1f}s", flush=True)
    return rows


def report(rows: list[Row], device: str) -> str:
    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(0)
        hardware = f"{props.name}, {props.total_memory / 2**30:.0f} GiB"
    else:
        hardware = "CPU (Triton interpreter: timings are not meaningful)"
    lines = [
        f"# Triton kernels, {datetime.date.today()}",
        "",
        f"{hardware}, torch {torch.__version__}",
        "",
        "| check | value | reference |",
        "|---|---|---|",
    ]
    lines += [f"| {r['check']} | {r['value']} | {r.get('ref', '')} |" for r in rows]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> list[Row]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--tiny", action="store_true", help="tiny shapes (for --device cpu: the interpreter)")
    parser.add_argument("--sweep", action="store_true", help="decode tile-size / warp variants")
    parser.add_argument("--only", default="", help=f"comma-separated sections of {','.join(SECTIONS)}")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args(argv)
    if args.device == "cpu":
        if not args.tiny:
            parser.error("--device cpu runs the kernels in Triton's interpreter: use it with --tiny")
        os.environ["TRITON_INTERPRET"] = "1"  # before any kernel module is imported
    elif not torch.cuda.is_available():
        parser.error("no CUDA device (use --device cpu --tiny to check the harness)")
    rows = run([], args.device, args.tiny, args.sweep, [s for s in args.only.split(",") if s] or None)
    text = report(rows, args.device)
    print(text, flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    tag = "cpu" if args.device == "cpu" else torch.cuda.get_device_name(0).split()[-1].lower()
    tag += "-tiny" if args.tiny else ""
    (args.out / f"gpu-kernels-{datetime.date.today()}-{tag}.md").write_text(text)
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
