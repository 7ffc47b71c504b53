"""When the project's Triton kernels can run, and the switches they take for Triton's CPU interpreter.

Kernels run on CUDA tensors. Under `TRITON_INTERPRET=1` (set by the test suite on machines without a GPU, before
any kernel module is imported) Triton runs them on CPU tensors instead, which is how CI checks them against the
torch reference. The interpreter multiplies bf16 operands of `tl.dot` wrongly, so kernels that call `tl.dot` take
an `UPCAST` flag that casts their operands to fp32 first when interpreting bf16 (bf16 dots are checked on a GPU).

Triton is optional: CPU-only torch wheels do not ship it, and nothing here imports it unless asked.
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch


@functools.cache
def triton_importable() -> bool:
    """Whether `import triton` works here (it ships with CUDA builds of torch on Linux)."""
    if importlib.util.find_spec("triton") is None:
        return False
    try:
        import triton
        import triton.language  # noqa: F401
    except Exception:  # a broken install counts as absent: the torch path still runs
        return False
    return True


def interpreting() -> bool:
    """Whether Triton kernels run in the CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def can_launch(t: torch.Tensor) -> bool:
    """Whether a Triton kernel can take `t`: a CUDA tensor, or any tensor while interpreting."""
    return triton_importable() and (t.is_cuda or interpreting())


def upcast_dots(dtype: torch.dtype) -> bool:
    """The `UPCAST` kernel flag: compute `tl.dot` on fp32 copies (only for bf16 in the interpreter)."""
    return interpreting() and dtype == torch.bfloat16


def dot_precision(dtype: torch.dtype) -> str:
    """`tl.dot` input precision: exact fp32 products for fp32 operands (Triton's default would use TF32),
    the default ("tf32", which does not apply to 16-bit operands) otherwise."""
    return "ieee" if dtype == torch.float32 or upcast_dots(dtype) else "tf32"


def next_power_of_2(n: int) -> int:
    """Smallest power of two >= n (tile extents given to `tl.arange` must be powers of two)."""
    return 1 << max(0, (n - 1).bit_length())
