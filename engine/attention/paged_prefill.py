"""Triton paged attention for any mix of prefill chunks and decode rows, reading K/V in place from the pool.

One launch per layer covers the whole flattened step (the "unified" layout): sequence i owns query rows
`query_start[i] : query_start[i + 1]`, which are its tokens at positions `context_len - query_len ...
context_len - 1`; everything before them is its cached prefix (a prefix-cache hit, or the earlier chunks of a
long image prompt), already in the pool, as are this step's own K/V (stored before attention runs).

Grid (T // BLOCK_Q + B, Hkv). A program takes BLOCK_Q consecutive query tokens of one sequence times the G query
heads of one KV head: a [BLOCK_M = BLOCK_Q * G (padded to a power of two), D] tile whose row m is token m // G,
head m % G, so each K/V tile is loaded once for the whole group. It finds its sequence by binary search over
`query_start` (sequence i's query blocks are numbered from `query_start[i] // BLOCK_Q + i`, which always leaves
room for its ceil(query_len / BLOCK_Q) blocks; surplus programs exit at once), then walks the context up to its
last token's position with an fp32 online softmax under a causal mask offset by the cached length. A decode row
is a sequence with query_len 1. Nothing on the host reads a device value.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from plm_serve.engine.attention.paged_tiles import load_kv_tile, online_softmax_update
from plm_serve.models.triton_support import dot_precision, next_power_of_2, upcast_dots

_LOG2E = 1.4426950408889634


@triton.jit
def _prefill_kernel(
    q_ptr,  # [T, Hq, D]
    k_cache_ptr,  # [num_blocks, block_size, Hkv, D]
    v_cache_ptr,
    block_tables_ptr,  # [B, max_blocks] int32
    context_lens_ptr,  # [B]
    query_start_ptr,  # [B + 1] int32
    out_ptr,  # [T, Hq, D]
    scale_log2,
    num_seqs,
    stride_qt,
    stride_qh,
    stride_kb,
    stride_ks,
    stride_kh,
    stride_vb,
    stride_vs,
    stride_vh,
    stride_bt,
    stride_ot,
    stride_oh,
    G: tl.constexpr,
    BLOCK_M: tl.constexpr,  # rows per program: BLOCK_Q tokens x G heads, padded to a power of two >= 16
    BLOCK_Q: tl.constexpr,  # = BLOCK_M // G query tokens
    D: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PAGE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    pid = tl.program_id(0)
    kvh = tl.program_id(1)
    # The sequence: the last i with query_start[i] // BLOCK_Q + i <= pid (strictly increasing in i).
    lo: tl.int32 = 0  # int32 bounds, also when the JIT specializes num_seqs == 1 into a constant
    hi: tl.int32 = num_seqs
    while lo < hi:
        mid = (lo + hi) // 2
        if tl.load(query_start_ptr + mid) // BLOCK_Q + mid <= pid:
            lo = mid + 1
        else:
            hi = mid
    seq = lo - 1
    q_first = tl.load(query_start_ptr + seq)
    q_len = tl.load(query_start_ptr + seq + 1) - q_first
    q_block = pid - (q_first // BLOCK_Q + seq)
    if q_block * BLOCK_Q >= q_len:
        return
    ctx = tl.load(context_lens_ptr + seq).to(tl.int32)
    cached = ctx - q_len

    rows = tl.arange(0, BLOCK_M)
    tok = q_block * BLOCK_Q + rows // G  # query index within the sequence's chunk
    head = kvh * G + rows % G
    row_ok = (rows < BLOCK_Q * G) & (tok < q_len)
    q_pos = cached + tok  # the token's position in its sequence: sees keys 0 .. q_pos
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < D
    q_row = (q_first + tok).to(tl.int64)
    q = tl.load(
        q_ptr + q_row[:, None] * stride_qt + head[:, None] * stride_qh + dims[None, :],
        mask=row_ok[:, None] & dim_ok[None, :],
        other=0.0,
    )
    if UPCAST:
        q = q.to(tl.float32)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    table = block_tables_ptr + seq.to(tl.int64) * stride_bt
    kv_end = tl.minimum(cached + (q_block + 1) * BLOCK_Q, ctx)  # one past this block's last visible key
    for n0 in range(0, kv_end, BLOCK_N):
        pos = n0 + tl.arange(0, BLOCK_N)
        valid = pos < kv_end
        k, v = load_kv_tile(
            k_cache_ptr, v_cache_ptr, table, pos, valid, dims, dim_ok, kvh,
            stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, PAGE, UPCAST,
        )  # fmt: skip
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * scale_log2  # [BLOCK_M, BLOCK_N]
        s = tl.where(valid[None, :] & (pos[None, :] <= q_pos[:, None]), s, float("-inf"))
        m_i, l_i, acc = online_softmax_update(s, v, m_i, l_i, acc, DOT_PREC)  # padding rows stay NaN-free

    out = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
    tl.store(
        out_ptr + q_row[:, None] * stride_ot + head[:, None] * stride_oh + dims[None, :],
        out.to(out_ptr.dtype.element_ty),
        mask=row_ok[:, None] & dim_ok[None, :],
    )


def default_block_m(num_queries_per_kv: int, max_query_len: int) -> int:
    """Rows per program: 16 for decode-like steps (one token x G heads fills a 16-row tile), 64 for prefill."""
    return max(16, next_power_of_2(num_queries_per_kv)) if max_query_len <= 1 else 64


def paged_prefill(
    q: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    query_start: torch.Tensor,
    max_query_len: int | None = None,
    scale: float | None = None,
    out: torch.Tensor | None = None,
    block_m: int | None = None,
    block_n: int = 64,
    num_warps: int | None = None,
    num_stages: int = 2,
) -> torch.Tensor:
    """Causal attention of the step's T query rows q [T, Hq, D] (RoPE applied) over each sequence's paged K/V.

    key_cache / value_cache: one layer's [num_blocks, block_size, Hkv, D], holding every sequence's cached
    prefix and this step's K/V; block_tables [B, max_blocks] int32; context_lens [B] (cached + this step's
    tokens); query_start [B + 1] int32 (sequence i owns rows query_start[i] : query_start[i + 1]). Returns
    out [T, Hq, D] in q's dtype. `max_query_len` (a host int) only picks the tile height `block_m` (a power of
    two >= 16 and >= G); the grid is (T // BLOCK_Q + B, Hkv), from shapes alone. `num_warps` defaults to 8 for
    tiles of 64 x 128 and more (the fp32 accumulator alone is 64 registers a thread at 4 warps), else 4.
    """
    t, hq, d = q.shape
    _, page, hkv, _ = key_cache.shape
    if hq % hkv:
        raise ValueError(f"{hq} query heads are not a multiple of {hkv} KV heads")
    if q.stride(-1) != 1 or key_cache.stride(-1) != 1 or value_cache.stride(-1) != 1:
        raise ValueError("q and the caches need a contiguous last (head_dim) dimension")
    g = hq // hkv
    block_m = block_m or default_block_m(g, t if max_query_len is None else max_query_len)
    if block_m < max(16, g) or block_m & (block_m - 1):
        raise ValueError(f"block_m must be a power of two >= max(16, {g}), got {block_m}")
    block_q = block_m // g
    block_d = max(16, next_power_of_2(d))
    num_warps = num_warps or (8 if block_m * block_d >= 64 * 128 else 4)
    num_seqs = block_tables.shape[0]
    out = torch.empty_like(q) if out is None else out
    scale = d**-0.5 if scale is None else scale
    _prefill_kernel[(t // block_q + num_seqs, hkv)](
        q,
        key_cache,
        value_cache,
        block_tables,
        context_lens,
        query_start,
        out,
        scale * _LOG2E,
        num_seqs,
        q.stride(0),
        q.stride(1),
        *key_cache.stride()[:3],
        *value_cache.stride()[:3],
        block_tables.stride(0),
        out.stride(0),
        out.stride(1),
        G=g,
        BLOCK_M=block_m,
        BLOCK_Q=block_q,
        D=d,
        BLOCK_D=block_d,
        PAGE=page,
        BLOCK_N=block_n,
        UPCAST=upcast_dots(q.dtype),
        DOT_PREC=dot_precision(q.dtype),
        num_warps=num_warps,
        num_stages=num_stages,
    )
    return out
