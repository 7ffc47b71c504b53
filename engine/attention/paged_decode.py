"""Triton paged decode attention: one query per sequence over its K/V read in place from the paged pool.

Grid (B, Hkv, S). The program for (sequence b, KV head h, split s) loads the G = Hq / Hkv query heads that share
KV head h as the rows of one [BLOCK_H >= 16, D] tile (tl.dot needs 16 rows; G is 4 for PLM-1B/8B, 3 for PLM-3B),
so each K/V tile is read from memory once for the whole group. It walks its share of the context in tiles of
BLOCK_N tokens, finding each token's slot through the block table (no gather, no copy), with an fp32 online
softmax. With S > 1 the context is split into S contiguous ranges ("split-K" / flash-decoding) so that a small
batch still fills the GPU; each split writes a normalized partial output and its log-sum-exp, and a second kernel
merges them. A row whose context length is 0 (a padding row of a CUDA-graph batch) writes zeros.

Nothing on the host reads a device value: the grid depends only on B (the padded batch) and the fixed S, so a
launch can be captured in a CUDA graph and replayed with other block tables and context lengths.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from plm_serve.engine.attention.paged_tiles import load_kv_tile, online_softmax_update
from plm_serve.models.triton_support import dot_precision, next_power_of_2, upcast_dots

_LOG2E = 1.4426950408889634
MAX_SPLITS = 32


@triton.jit
def _decode_split_kernel(
    q_ptr,  # [B, Hq, D]
    k_cache_ptr,  # [num_blocks, block_size, Hkv, D]
    v_cache_ptr,
    block_tables_ptr,  # [B, max_blocks] int32
    context_lens_ptr,  # [B]
    out_ptr,  # [B, Hq, D] (used when NUM_SPLITS == 1)
    part_out_ptr,  # [B, Hq, NUM_SPLITS, D] fp32 (used when NUM_SPLITS > 1)
    part_lse_ptr,  # [B, Hq, NUM_SPLITS] fp32, log2 domain
    scale_log2,  # softmax scale * log2(e): scores live in the exp2 domain
    stride_qb,
    stride_qh,
    stride_kb,
    stride_ks,
    stride_kh,
    stride_vb,
    stride_vs,
    stride_vh,
    stride_bt,
    stride_ob,
    stride_oh,
    G: tl.constexpr,  # query heads per KV head
    BLOCK_H: tl.constexpr,  # G padded to >= 16 rows
    D: tl.constexpr,
    BLOCK_D: tl.constexpr,  # D padded to a power of two >= 16
    PAGE: tl.constexpr,  # tokens per KV block
    BLOCK_N: tl.constexpr,  # context tokens per tile
    NUM_SPLITS: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    ctx = tl.load(context_lens_ptr + b).to(tl.int32)

    heads = tl.arange(0, BLOCK_H)
    dims = tl.arange(0, BLOCK_D)
    head_ok = heads < G
    dim_ok = dims < D
    q_offs = b.to(tl.int64) * stride_qb + (kvh * G + heads)[:, None] * stride_qh + dims[None, :]
    q = tl.load(q_ptr + q_offs, mask=head_ok[:, None] & dim_ok[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)

    # This split's token range: whole tiles, so splits never share a tile.
    tiles_per_split = tl.cdiv(tl.cdiv(ctx, BLOCK_N), NUM_SPLITS)
    start = split * tiles_per_split * BLOCK_N
    end = tl.minimum(start + tiles_per_split * BLOCK_N, ctx)

    m_i = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], dtype=tl.float32)
    table = block_tables_ptr + b.to(tl.int64) * stride_bt
    for n0 in range(start, end, BLOCK_N):
        pos = n0 + tl.arange(0, BLOCK_N)
        valid = pos < end
        k, v = load_kv_tile(
            k_cache_ptr, v_cache_ptr, table, pos, valid, dims, dim_ok, kvh,
            stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, PAGE, UPCAST,
        )  # fmt: skip
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * scale_log2  # [BLOCK_H, BLOCK_N]
        s = tl.where(valid[None, :], s, float("-inf"))
        m_i, l_i, acc = online_softmax_update(s, v, m_i, l_i, acc, DOT_PREC)

    # An empty range (context 0, or a split past the end of a short context) leaves l_i = 0 and acc = 0.
    has_keys = l_i > 0.0
    out = acc / tl.where(has_keys, l_i, 1.0)[:, None]
    row_ok = head_ok[:, None] & dim_ok[None, :]
    if NUM_SPLITS == 1:
        o_offs = b.to(tl.int64) * stride_ob + (kvh * G + heads)[:, None] * stride_oh + dims[None, :]
        tl.store(out_ptr + o_offs, out.to(out_ptr.dtype.element_ty), mask=row_ok)
    else:
        rows = (b * (G * tl.num_programs(1)) + kvh * G + heads).to(tl.int64) * NUM_SPLITS + split  # [BLOCK_H]
        tl.store(part_out_ptr + rows[:, None] * D + dims[None, :], out, mask=row_ok)
        lse = tl.where(has_keys, m_i + tl.log2(tl.where(has_keys, l_i, 1.0)), float("-inf"))
        tl.store(part_lse_ptr + rows, lse, mask=head_ok)


@triton.jit
def _decode_merge_kernel(
    part_out_ptr,  # [B, Hq, NUM_SPLITS, D] fp32
    part_lse_ptr,  # [B, Hq, NUM_SPLITS] fp32, log2 domain
    out_ptr,  # [B, Hq, D]
    stride_ob,
    stride_oh,
    D: tl.constexpr,
    BLOCK_D: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    row = b.to(tl.int64) * tl.num_programs(1) + h
    splits = tl.arange(0, BLOCK_S)
    dims = tl.arange(0, BLOCK_D)
    split_ok = splits < NUM_SPLITS
    lse = tl.load(part_lse_ptr + row * NUM_SPLITS + splits, mask=split_ok, other=float("-inf"))
    top = tl.max(lse, 0)
    top = tl.where(top == float("-inf"), 0.0, top)  # no split saw a key (context 0): every weight is 0
    w = tl.exp2(lse - top)  # [BLOCK_S]
    parts = tl.load(
        part_out_ptr + (row * NUM_SPLITS + splits)[:, None] * D + dims[None, :],
        mask=split_ok[:, None] & (dims < D)[None, :],
        other=0.0,
    )
    total = tl.sum(w, 0)
    out = tl.sum(parts * w[:, None], 0) / tl.where(total > 0.0, total, 1.0)
    tl.store(
        out_ptr + b.to(tl.int64) * stride_ob + h * stride_oh + dims,
        out.to(out_ptr.dtype.element_ty),
        mask=dims < D,
    )


@dataclass
class DecodeWorkspace:
    """Split-K scratch for one step, reused by every layer: partial outputs and their log-sum-exps."""

    partial_out: torch.Tensor  # [B, Hq, S, D] fp32
    partial_lse: torch.Tensor  # [B, Hq, S] fp32

    @classmethod
    def allocate(
        cls, num_seqs: int, num_heads: int, num_splits: int, head_dim: int, device: torch.device
    ) -> DecodeWorkspace:
        return cls(
            torch.empty(num_seqs, num_heads, num_splits, head_dim, dtype=torch.float32, device=device),
            torch.empty(num_seqs, num_heads, num_splits, dtype=torch.float32, device=device),
        )


def choose_num_splits(num_seqs: int, num_kv_heads: int, num_sms: int, waves: int = 2) -> int:
    """Splits per sequence so that B * Hkv * S programs give about `waves` programs per SM, capped at MAX_SPLITS.

    Depends only on the (padded) batch size, never on context lengths, so one CUDA graph per batch size serves
    every context. H200 (132 SMs), 8 KV heads: B=1 -> 32, B=8 -> 8, B=32 -> 2 (rounded up to a power of
    two: 264 / 64 -> 5 -> 8), B >= 33 -> 1. Splits past the end of a short context exit at once.
    """
    programs = max(1, num_seqs * num_kv_heads)
    return min(MAX_SPLITS, next_power_of_2(math.ceil(waves * num_sms / programs)))


def paged_decode(
    q: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    num_splits: int = 1,
    scale: float | None = None,
    out: torch.Tensor | None = None,
    workspace: DecodeWorkspace | None = None,
    block_n: int = 64,
    num_warps: int = 4,
    num_stages: int = 2,
) -> torch.Tensor:
    """Decode attention of q [B, Hq, D] (row b = sequence b's one query, RoPE applied) over the paged pool.

    key_cache / value_cache: one layer's [num_blocks, block_size, Hkv, D] (last dim contiguous);
    block_tables [B, max_blocks] int32; context_lens [B] (tokens to attend to, including this step's, which
    must already be stored; 0 = padding row, output zeros). Returns out [B, Hq, D] in q's dtype.
    `num_splits` S >= 1 (see `choose_num_splits`); `workspace` (from `DecodeWorkspace.allocate(B, Hq, S, D)`)
    avoids an allocation per call. `block_n` (a power of two >= 16) and the launch options are tuning knobs.
    """
    b, hq, d = q.shape
    _, page, hkv, _ = key_cache.shape
    if hq % hkv:
        raise ValueError(f"{hq} query heads are not a multiple of {hkv} KV heads")
    if not 1 <= num_splits <= MAX_SPLITS:
        raise ValueError(f"num_splits must be in 1..{MAX_SPLITS}, got {num_splits}")
    if q.stride(-1) != 1 or key_cache.stride(-1) != 1 or value_cache.stride(-1) != 1:
        raise ValueError("q and the caches need a contiguous last (head_dim) dimension")
    g = hq // hkv
    out = torch.empty_like(q) if out is None else out
    if num_splits > 1 and workspace is None:
        workspace = DecodeWorkspace.allocate(b, hq, num_splits, d, q.device)
    part_out = workspace.partial_out if workspace is not None else out
    part_lse = workspace.partial_lse if workspace is not None else out
    scale = d**-0.5 if scale is None else scale
    block_d = max(16, next_power_of_2(d))
    _decode_split_kernel[(b, hkv, num_splits)](
        q,
        key_cache,
        value_cache,
        block_tables,
        context_lens,
        out,
        part_out,
        part_lse,
        scale * _LOG2E,
        q.stride(0),
        q.stride(1),
        *key_cache.stride()[:3],
        *value_cache.stride()[:3],
        block_tables.stride(0),
        out.stride(0),
        out.stride(1),
        G=g,
        BLOCK_H=max(16, next_power_of_2(g)),
        D=d,
        BLOCK_D=block_d,
        PAGE=page,
        BLOCK_N=block_n,
        NUM_SPLITS=num_splits,
        UPCAST=upcast_dots(q.dtype),
        DOT_PREC=dot_precision(q.dtype),
        num_warps=num_warps,
        num_stages=num_stages,
    )
    if num_splits > 1:
        _decode_merge_kernel[(b, hq)](
            part_out,
            part_lse,
            out,
            out.stride(0),
            out.stride(1),
            D=d,
            BLOCK_D=block_d,
            NUM_SPLITS=num_splits,
            BLOCK_S=next_power_of_2(num_splits),
        )
    return out
