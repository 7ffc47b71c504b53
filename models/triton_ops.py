"""Triton kernels behind `models.fused_ops` (imported only when they run: on CUDA, or under the interpreter).

Each keeps the torch definition's roundings: a value the reference holds in the activation dtype is rounded
to that dtype here too before it is used again (the residual sum, the normalized x before the weight multiply,
silu(gate) before the multiply by up); everything else is computed in fp32. Rows are one program each (RMSNorm:
the whole hidden vector, at most 64k elements) or tiles of 1024 columns (silu * mul).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from plm_serve.models.fused_ops import add_rms_norm_reference, rms_norm_reference
from plm_serve.models.triton_support import next_power_of_2

_SILU_BLOCK = 1024


@triton.jit
def _rms_norm_kernel(
    x_ptr,  # [T, N]
    res_ptr,  # [T, N] (HAS_RESIDUAL)
    w_ptr,  # [N]
    out_ptr,  # [T, N]
    res_out_ptr,  # [T, N] (HAS_RESIDUAL): residual + x
    stride_x,
    stride_r,
    stride_o,
    stride_ro,
    N,
    eps,
    BLOCK: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    ok = cols < N
    x = tl.load(x_ptr + row * stride_x + cols, mask=ok, other=0.0)
    dt = x.dtype
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + row * stride_r + cols, mask=ok, other=0.0)
        x = (r.to(tl.float32) + x.to(tl.float32)).to(dt)
        tl.store(res_out_ptr + row * stride_ro + cols, x, mask=ok)
    xf = x.to(tl.float32)
    mean_sq = tl.sum(xf * xf, 0) / N
    normed = (xf * tl.rsqrt(mean_sq + eps)).to(dt)
    w = tl.load(w_ptr + cols, mask=ok, other=0.0)
    tl.store(out_ptr + row * stride_o + cols, (w.to(tl.float32) * normed.to(tl.float32)).to(dt), mask=ok)


@triton.jit
def _silu_mul_kernel(x_ptr, out_ptr, stride_x, stride_o, N, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < N
    gate = tl.load(x_ptr + row * stride_x + cols, mask=ok, other=0.0)
    up = tl.load(x_ptr + row * stride_x + N + cols, mask=ok, other=0.0)
    dt = up.dtype
    g = gate.to(tl.float32)
    silu = (g / (1.0 + tl.exp(-g))).to(dt)
    tl.store(out_ptr + row * stride_o + cols, (silu.to(tl.float32) * up.to(tl.float32)).to(dt), mask=ok)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """[..., N] -> a [T, N] view (copied only if the last dim is not contiguous)."""
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def _norm_launch(n: int) -> tuple[int, int]:
    block = next_power_of_2(n)
    return block, min(16, max(1, block // 512))


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """One launch of `fused_ops.rms_norm` (weight in another dtype than x: the torch definition)."""
    if weight.dtype != x.dtype or x.shape[-1] > 65536:
        return rms_norm_reference(x, weight, eps)
    x2 = _rows(x)
    out = torch.empty_like(x2)
    block, warps = _norm_launch(x2.shape[1])
    if x2.shape[0]:
        _rms_norm_kernel[(x2.shape[0],)](
            x2, x2, weight, out, out, x2.stride(0), 0, out.stride(0), 0, x2.shape[1], eps,
            BLOCK=block, HAS_RESIDUAL=False, num_warps=warps,
        )  # fmt: skip
    return out.view(x.shape)


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """One launch of `fused_ops.add_rms_norm`: (normed, residual + x)."""
    if not (weight.dtype == x.dtype == residual.dtype) or x.shape != residual.shape or x.shape[-1] > 65536:
        return add_rms_norm_reference(x, residual, weight, eps)
    x2, r2 = _rows(x), _rows(residual)
    out, summed = torch.empty_like(x2), torch.empty_like(x2)
    block, warps = _norm_launch(x2.shape[1])
    if x2.shape[0]:
        _rms_norm_kernel[(x2.shape[0],)](
            x2, r2, weight, out, summed, x2.stride(0), r2.stride(0), out.stride(0), summed.stride(0),
            x2.shape[1], eps, BLOCK=block, HAS_RESIDUAL=True, num_warps=warps,
        )  # fmt: skip
    return out.view(x.shape), summed.view(x.shape)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """One launch of `fused_ops.silu_mul`: [..., 2F] -> [..., F]."""
    x2 = _rows(gate_up)
    n = x2.shape[1] // 2
    out = torch.empty(x2.shape[0], n, dtype=x2.dtype, device=x2.device)
    if x2.shape[0]:
        grid = (x2.shape[0], triton.cdiv(n, _SILU_BLOCK))
        _silu_mul_kernel[grid](x2, out, x2.stride(0), out.stride(0), n, BLOCK=_SILU_BLOCK, num_warps=4)
    return out.view(*gate_up.shape[:-1], n)
