"""The seam between the decoder and whatever stores its keys and values.

The Llama decoder works on a flattened (varlen) batch: all tokens of all sequences scheduled in one step,
concatenated into T rows. Each attention layer projects q/k/v, applies RoPE, and hands them to an `Attention`
object; what happens next (write K/V into a paged cache, attend over a block table, run a Triton or flash-attn
kernel) belongs to the object, which the engine builds for every step. The model code never changes when a
backend is added. A backend that can fuse RoPE into its K/V store also offers `rotary` (see `RotaryAttention`);
the decoder then hands it q and k before RoPE together with the step's cos/sin tables.

Every SDPA call here runs with cuDNN attention disabled (`no_cudnn_sdpa`): torch's cuDNN backend (the first
choice on Hopper with recent cuDNN) builds and caches one graph per sequence-length shape, so prompts of new
lengths, or a decode context that grows by one token per step, would pay a graph build on every call. Flash,
memory-efficient and math kernels have no per-shape set-up.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Protocol

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right


class Attention(Protocol):
    """Causal self-attention for one step of the decoder.

    q: [T, num_heads, head_dim], k and v: [T, num_kv_heads, head_dim] (RoPE already applied);
    returns [T, num_heads, head_dim]. `layer` selects the layer's KV storage.
    """

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor: ...


class RotaryAttention(Attention, Protocol):
    """An `Attention` that can also apply the decoder's rotate-half RoPE itself (fused with storing K/V).

    `rotary(layer, q, k, v, cos, sin)` takes q and k BEFORE RoPE and cos/sin [T, 1, head_dim] (from
    `models.rope.LlamaRotaryEmbedding`) and must return what `__call__` returns for the rotated q and k
    (`models.rope.apply_rotate_half`). The decoder calls it whenever the backend has it.
    """

    def rotary(
        self,
        layer: int,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
    ) -> torch.Tensor: ...


@contextlib.contextmanager
def no_cudnn_sdpa() -> Iterator[None]:
    """SDPA calls inside may use flash, memory-efficient or math kernels (as enabled), never cuDNN.

    The switch is torch's process-wide flag, restored on exit: two threads overlapping here may briefly see
    each other's setting, which can only cost speed (a cuDNN call), never change a result.
    """
    was = torch.backends.cuda.cudnn_sdp_enabled()
    torch.backends.cuda.enable_cudnn_sdp(False)
    try:
        yield
    finally:
        torch.backends.cuda.enable_cudnn_sdp(was)


class DenseCausalAttention:
    """No cache: each sequence of the batch attends causally to itself only.

    `seq_lens` lists the lengths of the sequences concatenated in the T rows. Used for full-sequence forwards
    (parity with transformers, scoring) and as the simplest reference backend.
    """

    def __init__(self, seq_lens: list[int]) -> None:
        self.seq_lens = seq_lens

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        out = torch.empty_like(q)
        start = 0
        for n in self.seq_lens:
            sl = slice(start, start + n)
            out[sl] = causal_sdpa(q[sl], k[sl], v[sl])
            start += n
        return out


def causal_sdpa(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_cached: int = 0, scale: float | None = None
) -> torch.Tensor:
    """Attention of q [S, Hq, D] over k/v [num_cached + S, Hkv, D]; query i sees keys 0 .. num_cached + i.

    GQA is handled by `enable_gqa`, so K/V are never repeated in memory. The tensors get a batch dim of 1:
    SDPA's fused CUDA kernels (flash, memory-efficient) accept only 4D inputs, and 3D ones silently fall back
    to the math kernel (measured on an H200: PLM-8B prefill of 9.5k tokens 2.8 s with 3D, 0.29 s with 4D).
    """
    s, kv_len = q.shape[0], k.shape[0]
    qh, kh, vh = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))  # [1, H, S, D]
    with no_cudnn_sdpa():
        if num_cached == 0 and s == kv_len:
            out = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, scale=scale, enable_gqa=True)
        elif q.device.type == "cpu" and num_cached <= 2 * s:
            # The CPU has a flash kernel only for top-left causal masks; a CausalBias falls back to the masked
            # math kernel, ~2.5x slower per useful FLOP (measured: a 4096-token chunk over a 4096-token prefix
            # 0.46 s against 0.19 s for the padded square). Zero query rows in front of the chunk make the problem
            # square (row num_cached + i sees keys 0 .. num_cached + i, as wanted); their work, at most 1.8x the
            # useful work while num_cached <= 2 S, is discarded. Longer prefixes keep the masked kernel.
            padded = torch.cat([qh.new_zeros(1, qh.shape[1], num_cached, qh.shape[3]), qh], dim=2)
            out = F.scaled_dot_product_attention(padded, kh, vh, is_causal=True, scale=scale, enable_gqa=True)
            out = out[:, :, num_cached:]
        else:
            # Bottom-right aligned causal mask as a CausalBias: on CUDA it dispatches to the flash kernel (which
            # aligns causal masks bottom-right) instead of materializing an [S, kv_len] mask for the math kernel.
            mask = causal_lower_right(s, kv_len)
            out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, scale=scale, enable_gqa=True)
    return out[0].transpose(0, 1)
