"""Compile every Triton kernel of the project for a GPU target without a GPU, and report its resource use.

    python bench/triton_compile.py [--arch 90] [--preset plm-1b --preset plm-8b]

The interpreter that runs the kernels in CI never compiles them, so a kernel could pass every CPU test and
still fail to compile (or spill registers, or lose vectorized loads) on the GPU. This records the arguments the
real launchers (`paged_decode`, `paged_prefill`, `store_kv`, the fused norms and silu*mul) pass for decoder
shapes of the given presets, specializes them the way Triton's JIT does at launch (types; 16-divisible pointers
and integers; integers equal to 1 become constants), and compiles each distinct variant down to a cubin with
the ptxas that ships with Triton. Per variant it prints the registers and spill stack (from the bundled
cuobjdump) and whether the K/V loads were software-pipelined (async copies in the TTGIR).

Needs only Triton (and the ptxas it bundles): nothing is launched, no GPU or driver is involved. It checks the
Triton installed here; the GPU machine's Triton version still has to compile the kernels itself. Must run
without TRITON_INTERPRET (a fresh process: the kernels are defined as interpreted functions otherwise). Uses
Triton's own argument specialization (`triton._C.libtriton.native_specialize_impl`, as in Triton 3.8). Exits 1
if a variant fails to compile.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("bench/triton_compile.py compiles kernels: run it without TRITON_INTERPRET=1")

import torch

if __package__ in (None, ""):
    import source_tree
else:
    from bench import source_tree
source_tree.ensure_importable()


@dataclass
class Launch:
    """One recorded kernel launch: the kernel, its positional arguments and its keyword arguments."""

    kernel: object  # triton.JITFunction
    args: tuple
    kwargs: dict

    @property
    def name(self) -> str:
        return self.kernel.fn.__name__  # type: ignore[attr-defined]


class _Recorder:
    """Stands in for a JITFunction: `kernel[grid](*args, **kwargs)` records the call instead of launching."""

    def __init__(self, kernel: object, sink: list[Launch]) -> None:
        self.kernel, self.sink = kernel, sink

    def __getitem__(self, grid: object):  # type: ignore[no-untyped-def]
        return lambda *args, **kwargs: self.sink.append(Launch(self.kernel, args, kwargs))


@contextlib.contextmanager
def recording(sink: list[Launch]) -> Iterator[None]:
    """Inside, every project kernel records its launches into `sink` instead of running."""
    from plm_serve.engine.attention import kv_store, paged_decode, paged_prefill
    from plm_serve.models import triton_ops

    kernels = [
        (paged_decode, "_decode_split_kernel"),
        (paged_decode, "_decode_merge_kernel"),
        (paged_prefill, "_prefill_kernel"),
        (kv_store, "_store_kernel"),
        (triton_ops, "_rms_norm_kernel"),
        (triton_ops, "_silu_mul_kernel"),
    ]
    saved = [(module, name, getattr(module, name)) for module, name in kernels]
    try:
        for module, name, kernel in saved:
            setattr(module, name, _Recorder(kernel, sink))
        yield
    finally:
        for module, name, kernel in saved:
            setattr(module, name, kernel)


def record_launches(preset: str) -> list[Launch]:
    """The launches of one decode step and one prefill step of a `preset`-shaped layer (bf16, CPU tensors)."""
    from plm_serve.engine.attention.kv_store import store_kv
    from plm_serve.engine.attention.paged_decode import paged_decode
    from plm_serve.engine.attention.paged_prefill import paged_prefill
    from plm_serve.models import PLMConfig, triton_ops

    text = PLMConfig.from_preset(preset).text
    hq, hkv, d, h, ff = (
        text.num_attention_heads,
        text.num_key_value_heads,
        text.head_dim,
        text.hidden_size,
        text.intermediate_size,
    )
    bf16, b, page, blocks = torch.bfloat16, 4, 16, 8
    pool = torch.zeros(2, blocks, page, hkv, d, dtype=bf16)
    tables = torch.zeros(b, 2, dtype=torch.int32)
    lens = torch.ones(b, dtype=torch.int64)
    starts = torch.arange(b + 1, dtype=torch.int32)
    qkv = torch.zeros(b, (hq + 2 * hkv) * d, dtype=bf16)  # views of a fused projection, as the decoder passes
    q, k, v = (t.view(b, -1, d) for t in qkv.split([hq * d, hkv * d, hkv * d], dim=-1))
    cos = sin = torch.zeros(b, 1, d, dtype=bf16)
    x = torch.zeros(b, h, dtype=bf16)
    sink: list[Launch] = []
    with recording(sink):
        store_kv(k, v, pool[0], pool[1], torch.zeros(b, dtype=torch.int64), q=q, cos=cos, sin=sin)
        q_rot = torch.zeros(b, hq, d, dtype=bf16)
        for splits in (1, 8):
            paged_decode(q_rot, pool[0], pool[1], tables, lens, num_splits=splits)
        paged_prefill(q_rot, pool[0], pool[1], tables, lens, starts, max_query_len=64)  # prefill-sized tiles
        one = torch.tensor(
            [0, b], dtype=torch.int32
        )  # one sequence (a long prompt): num_seqs becomes a constant
        paged_prefill(q_rot, pool[0], pool[1], tables[:1], lens[:1], one, max_query_len=b)
        triton_ops.add_rms_norm(x, x, x[0], 1e-5)
        triton_ops.silu_mul(torch.zeros(b, 2 * ff, dtype=bf16))
    return sink


def specialize(launch: Launch) -> tuple[dict, dict, dict, dict]:
    """(signature, constexprs, attrs, options) as Triton's JIT would build them for this launch."""
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend

    fn = launch.kernel
    names = fn.arg_names  # type: ignore[attr-defined]
    options = {k: launch.kwargs[k] for k in ("num_warps", "num_stages") if k in launch.kwargs}
    values = dict(zip(names, launch.args, strict=False))
    values.update({k: v for k, v in launch.kwargs.items() if k not in options})
    constexpr_names = {names[i] for i in fn.constexprs}  # type: ignore[attr-defined]
    signature, constexprs, attrs = {}, {}, {}
    for i, name in enumerate(names):
        value = values[name]
        if name in constexpr_names:
            signature[name], constexprs[(i,)] = "constexpr", value
            continue
        kind, key = native_specialize_impl(BaseBackend, value, False, True, True)
        signature[name] = kind
        if kind == "constexpr":  # an integer equal to 1
            constexprs[(i,)] = key
        elif key == "D":
            attrs[(i,)] = [["tt.divisibility", 16]]
    return signature, constexprs, attrs, options


def _resources(cubin: bytes) -> str:
    import triton

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not tool.is_file():
        return "n/a (no cuobjdump)"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([str(tool), "-res-usage", f.name], capture_output=True, text=True).stdout
    fields = dict(part.split(":", 1) for line in out.splitlines() if "REG:" in line for part in line.split())
    return f"{fields.get('REG', '?')} registers, {fields.get('STACK', '?')} B stack"


def compile_all(presets: list[str], arch: int) -> list[dict]:
    """Compile each distinct launch of `presets` for sm_<arch>; one row per variant."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    rows, seen = [], set()
    for preset in presets:
        for launch in record_launches(preset):
            signature, constexprs, attrs, options = specialize(launch)
            key = (launch.name, str(signature), str(constexprs), str(attrs), str(options))
            if key in seen:
                continue
            seen.add(key)
            shown = {
                signature_name: v for (i,), v in constexprs.items() for signature_name in [list(signature)[i]]
            }
            row = {"preset": preset, "kernel": launch.name, "constexprs": shown, **options}
            t0 = time.perf_counter()
            try:
                src = ASTSource(fn=launch.kernel, signature=signature, constexprs=constexprs, attrs=attrs)
                compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
            except Exception as exc:
                row.update(ok=False, error=f"{type(exc).__name__}: {exc}"[:500])
            else:
                ttgir = compiled.asm["ttgir"]
                row.update(
                    ok=True,
                    resources=_resources(compiled.asm["cubin"]),
                    pipelined="async_copy_global_to_local" in ttgir,
                )
            row["seconds"] = time.perf_counter() - t0
            rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability x10 (90 = H100/H200)")
    parser.add_argument("--preset", action="append", help="model shapes (default: plm-1b and plm-8b)")
    args = parser.parse_args(argv)
    rows = compile_all(args.preset or ["plm-1b", "plm-8b"], args.arch)
    for r in rows:
        status = f"{r['resources']}, pipelined loads: {r['pipelined']}" if r["ok"] else f"FAILED {r['error']}"
        print(
            f"{r['preset']:8} {r['kernel']:22} {r['seconds']:5.1f}s  {status}  {r['constexprs']}", flush=True
        )
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
