"""The decoder's elementwise steps as single kernels on CUDA, with their torch definitions everywhere else.

- `rms_norm(x, w)`: the RMSNorm of transformers' Llama, in its cast order: normalize in fp32, cast back to the
  activation dtype, then multiply by the weight (in that dtype);
- `add_rms_norm(x, residual, w)`: the residual add (in the activation dtype) and the next RMSNorm of its sum;
  returns (normed, sum), the sum being the new residual stream;
- `silu_mul(gate_up)`: silu(gate) * up over the two halves of the merged gate/up projection.

On CUDA tensors each is one Triton kernel (`models.triton_ops`) instead of 2-5 eager launches; the kernels keep
the reference's roundings (each intermediate the reference rounds to bf16 is rounded there too). Anywhere else
(the CPU, or without Triton) the torch code below runs: it is the definition, bit-identical to the unfused
modules. `kernel_mode` switches this process-wide: "torch" forces the definitions on CUDA too (comparisons),
"triton" sends every tensor through the kernels (CPU tensors then need Triton's interpreter: tests, the tiny
benchmark).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F

from plm_serve.models.triton_support import triton_importable

KERNEL_MODES = ("auto", "torch", "triton")
_mode = "auto"


@contextlib.contextmanager
def kernel_mode(mode: str) -> Iterator[None]:
    """Inside: "auto" (Triton for CUDA tensors, the default), "torch" (never Triton) or "triton" (always)."""
    global _mode
    if mode not in KERNEL_MODES:
        raise ValueError(f"kernel mode must be one of {KERNEL_MODES}, got {mode!r}")
    previous, _mode = _mode, mode
    try:
        yield
    finally:
        _mode = previous


def _kernels(x: torch.Tensor):
    """The Triton kernel module when `x` should go through it, else None."""
    if _mode == "torch" or not triton_importable() or (_mode == "auto" and not x.is_cuda):
        return None
    from plm_serve.models import triton_ops

    return triton_ops


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight * (x / rms(x) in fp32, cast to x's dtype). F.rms_norm is x * rsqrt(mean(x^2) + eps): on the CPU
    it decomposes into exactly those ops."""
    normed = F.rms_norm(x.float(), (x.shape[-1],), eps=eps)
    return weight * normed.to(x.dtype)


def add_rms_norm_reference(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    summed = residual + x
    return rms_norm_reference(summed, weight, eps), summed


def silu_mul_reference(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [..., H], weight [H] -> [..., H] in x's dtype (see the module docstring for the cast order)."""
    kernels = _kernels(x)
    return kernels.rms_norm(x, weight, eps) if kernels else rms_norm_reference(x, weight, eps)


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(residual + x), residual + x), both [..., H] in x's dtype."""
    kernels = _kernels(x)
    if kernels:
        return kernels.add_rms_norm(x, residual, weight, eps)
    return add_rms_norm_reference(x, residual, weight, eps)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up [..., 2F] (gate half first) -> silu(gate) * up [..., F]."""
    kernels = _kernels(gate_up)
    return kernels.silu_mul(gate_up) if kernels else silu_mul_reference(gate_up)
