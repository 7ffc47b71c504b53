"""Triton device functions shared by the paged attention kernels (paged_decode.py, paged_prefill.py).

`load_kv_tile` reads the K and V of a tile of context positions straight from the paged pool, finding each
position's slot through the sequence's block table (no gather, no copy); `online_softmax_update` folds one tile
of scores into the running fp32 softmax state (max, sum, weighted values) in the exp2 domain. Both are inlined
into the calling kernel by Triton, so sharing them costs nothing at run time.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def load_kv_tile(
    k_cache_ptr,  # [num_blocks, block_size, Hkv, D]
    v_cache_ptr,
    table,  # pointer to this sequence's block-table row (int32)
    pos,  # [BLOCK_N] context positions of the tile
    valid,  # [BLOCK_N] positions to read (others load as 0)
    dims,  # [BLOCK_D] head dimensions
    dim_ok,  # [BLOCK_D] dims < D
    kvh,  # the KV head
    stride_kb,
    stride_ks,
    stride_kh,
    stride_vb,
    stride_vs,
    stride_vh,
    PAGE: tl.constexpr,  # tokens per KV block
    UPCAST: tl.constexpr,  # fp32 tiles (the CPU interpreter computes bf16 dots wrongly)
):
    """K and V of the tile, each [BLOCK_N, BLOCK_D]."""
    blk = tl.load(table + pos // PAGE, mask=valid, other=0).to(tl.int64)
    off = pos % PAGE
    kv_ok = valid[:, None] & dim_ok[None, :]
    k = tl.load(
        k_cache_ptr + blk[:, None] * stride_kb + off[:, None] * stride_ks + kvh * stride_kh + dims[None, :],
        mask=kv_ok,
        other=0.0,
    )
    v = tl.load(
        v_cache_ptr + blk[:, None] * stride_vb + off[:, None] * stride_vs + kvh * stride_vh + dims[None, :],
        mask=kv_ok,
        other=0.0,
    )
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    return k, v


@triton.jit
def online_softmax_update(s, v, m_i, l_i, acc, DOT_PREC: tl.constexpr):
    """Fold scores s [M, BLOCK_N] (log2 domain, -inf where masked) and their values v [BLOCK_N, BLOCK_D] into the
    running max m_i [M], sum l_i [M] and accumulator acc [M, BLOCK_D]; returns the new (m_i, l_i, acc).
    A row that has seen no key yet keeps m_i = -inf without producing NaN."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(s - m_use[:, None])
    alpha = tl.exp2(m_i - m_use)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
    return m_new, l_i, acc
