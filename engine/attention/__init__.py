"""Paged-KV attention backends. Each implements `models.attention.Attention` for one engine step.

- "torch": `TorchPagedAttention`, plain PyTorch; runs anywhere; the CPU path and the oracle for the others.
- "triton": `TritonPagedAttention`, Triton kernels reading the pool in place (CUDA; or the CPU interpreter
  under TRITON_INTERPRET=1, which is how the tests run it). Imported only when chosen: Triton is optional.
- "auto": Triton on CUDA when it imports and supports the shapes, else torch.
"""

from __future__ import annotations

from plm_serve.engine.attention.kv_cache import KVCache
from plm_serve.engine.attention.metadata import AttentionMetadata
from plm_serve.engine.attention.torch_paged import TorchPagedAttention
from plm_serve.engine.config import ATTENTION_BACKENDS
from plm_serve.models.attention import Attention
from plm_serve.models.triton_support import can_launch, triton_importable

MAX_TRITON_HEAD_DIM = (
    256  # one [16, D] query tile and [BLOCK_N, D] K/V tiles per program must fit in registers
)


def resolve_backend(backend: str, kv_cache: KVCache) -> str:
    """ "auto" | "torch" | "triton" -> the backend that will run ("torch" or "triton") for this pool.

    Raises ValueError for an unknown name, or for "triton" where its kernels cannot run (no Triton, a CPU pool
    outside the interpreter, an odd or too large head_dim).
    """
    if backend not in ATTENTION_BACKENDS:
        raise ValueError(
            f"unknown attention backend {backend!r}; choose one of {', '.join(ATTENTION_BACKENDS)}"
        )
    if backend == "torch":
        return "torch"
    head_dim = kv_cache.data.shape[-1]
    shapes_ok = head_dim % 2 == 0 and head_dim <= MAX_TRITON_HEAD_DIM
    if backend == "auto":
        return "triton" if kv_cache.data.is_cuda and triton_importable() and shapes_ok else "torch"
    if not can_launch(kv_cache.data):
        raise ValueError(
            "the triton attention backend needs Triton and a CUDA KV pool (or TRITON_INTERPRET=1)"
        )
    if not shapes_ok:
        raise ValueError(f"the triton attention backend supports even head_dim <= 256, not {head_dim}")
    return "triton"


def make_attention(
    kv_cache: KVCache, metadata: AttentionMetadata, backend: str = "auto", num_splits: int | None = None
) -> Attention:
    """The step's attention object over `kv_cache`. `backend`: "auto" (default), "torch" (the reference, e.g.
    to compare against) or "triton". `num_splits`: decode split-K factor for Triton (None: by batch size)."""
    if resolve_backend(backend, kv_cache) == "torch":
        return TorchPagedAttention(kv_cache, metadata)
    from plm_serve.engine.attention.triton_paged import TritonPagedAttention

    return TritonPagedAttention(kv_cache, metadata, num_splits=num_splits)


__all__ = [
    "ATTENTION_BACKENDS",
    "AttentionMetadata",
    "KVCache",
    "TorchPagedAttention",
    "make_attention",
    "resolve_backend",
]
