"""Triton kernel that writes a step's keys and values into their cache slots, optionally rotating q and k first.

One program per token row t (grid (T,)). With `rope`, it applies the decoder's rotate-half RoPE to all query
and key heads of the row with that row's cos/sin, writes the rotated queries to `q_out` and the rotated keys
(plus the values) to `slot_mapping[t]`; without, it only stores k and v. A row with slot -1 (padding of a CUDA
graph batch) stores nothing.

The rotation reproduces the reference op for op in the activation dtype (`x * cos + rotate_half(x) * sin`, each
product rounded to the dtype, then the sum): q and k come out bit-identical to `models.rope.apply_rotate_half`
wherever the backend does not contract a product and a sum into one FMA (at most an ulp there).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from plm_serve.models.triton_support import next_power_of_2


@triton.jit
def _rotate_half(
    x_ptr, cos_ptr, sin_ptr, heads, head_ok, HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, stride_h
):
    """Rows `heads` of one token: (x1, x2) -> (x1*c1 - x2*s1, x2*c2 + x1*s2), rounded like the torch ops."""
    dims = tl.arange(0, BLOCK_HALF)
    ok = head_ok[:, None] & (dims < HALF)[None, :]
    ptrs = x_ptr + heads[:, None] * stride_h + dims[None, :]
    x1 = tl.load(ptrs, mask=ok, other=0.0)
    dt = x1.dtype
    x1 = x1.to(tl.float32)
    x2 = tl.load(ptrs + HALF, mask=ok, other=0.0).to(tl.float32)
    half_ok = dims < HALF
    c1 = tl.load(cos_ptr + dims, mask=half_ok, other=0.0).to(tl.float32)[None, :]
    c2 = tl.load(cos_ptr + HALF + dims, mask=half_ok, other=0.0).to(tl.float32)[None, :]
    s1 = tl.load(sin_ptr + dims, mask=half_ok, other=0.0).to(tl.float32)[None, :]
    s2 = tl.load(sin_ptr + HALF + dims, mask=half_ok, other=0.0).to(tl.float32)[None, :]
    # The product of two 16-bit floats is exact in fp32, so rounding it to the dtype gives torch's product.
    f1 = (x1 * c1).to(dt).to(tl.float32) - (x2 * s1).to(dt).to(tl.float32)
    f2 = (x2 * c2).to(dt).to(tl.float32) + (x1 * s2).to(dt).to(tl.float32)
    return f1.to(dt), f2.to(dt), ok


@triton.jit
def _store_kernel(
    q_ptr,  # [T, Hq, D] (read with ROPE)
    k_ptr,  # [T, Hkv, D]
    v_ptr,  # [T, Hkv, D]
    cos_ptr,  # [T, D] rows (any row stride)
    sin_ptr,
    slot_ptr,  # [T] int64, -1 = padding
    q_out_ptr,  # [T, Hq, D] (written with ROPE)
    k_cache_ptr,  # [num_blocks, block_size, Hkv, D]
    v_cache_ptr,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_cos,
    stride_sin,
    stride_qot,
    stride_qoh,
    stride_kcb,
    stride_kcs,
    stride_kch,
    stride_vcb,
    stride_vcs,
    stride_vch,
    HQ: tl.constexpr,
    HKV: tl.constexpr,
    D: tl.constexpr,
    BLOCK_HQ: tl.constexpr,
    BLOCK_HKV: tl.constexpr,
    BLOCK_D: tl.constexpr,
    HALF: tl.constexpr,  # D // 2
    BLOCK_HALF: tl.constexpr,
    PAGE: tl.constexpr,
    ROPE: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + t)
    kv_heads = tl.arange(0, BLOCK_HKV)
    kv_ok = kv_heads < HKV
    k_row = k_ptr + t * stride_kt
    v_row = v_ptr + t * stride_vt
    blk = slot // PAGE
    off = slot % PAGE
    kc = k_cache_ptr + blk * stride_kcb + off * stride_kcs + kv_heads[:, None] * stride_kch
    vc = v_cache_ptr + blk * stride_vcb + off * stride_vcs + kv_heads[:, None] * stride_vch
    store = slot >= 0
    if ROPE:
        cos_row = cos_ptr + t * stride_cos
        sin_row = sin_ptr + t * stride_sin
        q_heads = tl.arange(0, BLOCK_HQ)
        q1, q2, q_ok = _rotate_half(
            q_ptr + t * stride_qt, cos_row, sin_row, q_heads, q_heads < HQ, HALF, BLOCK_HALF, stride_qh
        )
        dims = tl.arange(0, BLOCK_HALF)[None, :]
        qo = q_out_ptr + t * stride_qot + q_heads[:, None] * stride_qoh + dims
        tl.store(qo, q1, mask=q_ok)
        tl.store(qo + HALF, q2, mask=q_ok)
        k1, k2, k_ok = _rotate_half(k_row, cos_row, sin_row, kv_heads, kv_ok, HALF, BLOCK_HALF, stride_kh)
        k_ok = k_ok & store
        tl.store(kc + dims, k1.to(k_cache_ptr.dtype.element_ty), mask=k_ok)
        tl.store(kc + HALF + dims, k2.to(k_cache_ptr.dtype.element_ty), mask=k_ok)
    else:
        dims = tl.arange(0, BLOCK_D)[None, :]
        ok = kv_ok[:, None] & (dims < D) & store
        k = tl.load(k_row + kv_heads[:, None] * stride_kh + dims, mask=ok, other=0.0)
        tl.store(kc + dims, k.to(k_cache_ptr.dtype.element_ty), mask=ok)
    dims = tl.arange(0, BLOCK_D)[None, :]
    ok = kv_ok[:, None] & (dims < D) & store
    v = tl.load(v_row + kv_heads[:, None] * stride_vh + dims, mask=ok, other=0.0)
    tl.store(vc + dims, v.to(v_cache_ptr.dtype.element_ty), mask=ok)


def store_kv(
    k: torch.Tensor,
    v: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    q: torch.Tensor | None = None,
    cos: torch.Tensor | None = None,
    sin: torch.Tensor | None = None,
    q_out: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """Write k/v [T, Hkv, D] into one layer's caches [num_blocks, block_size, Hkv, D] at `slot_mapping` [T].

    With q [T, Hq, D] and cos/sin (anything that views as [T, D] rows, e.g. the decoder's [T, 1, D]), q and k
    are first rotated (rotate-half RoPE, head_dim even): the rotated k is what is stored, and the rotated q
    is returned (in `q_out` if given, else a new [T, Hq, D] tensor). Without q, returns None. Slot -1 rows
    write nothing. Inputs may be strided views (e.g. slices of a fused qkv projection) with a contiguous
    last dim.
    """
    t, hkv, d = k.shape
    rope = q is not None
    if rope and (cos is None or sin is None):
        raise ValueError("rotating q and k needs cos and sin")
    if rope and d % 2:
        raise ValueError(f"rotate-half RoPE needs an even head_dim, got {d}")
    if any(x.stride(-1) != 1 for x in (k, v, key_cache, value_cache)):
        raise ValueError("k, v and the caches need a contiguous last (head_dim) dimension")
    if rope:
        assert q is not None and cos is not None and sin is not None
        cos, sin = cos.reshape(t, d), sin.reshape(t, d)
        q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device) if q_out is None else q_out
        q_args = (q, q_out)
        q_strides = (q.stride(0), q.stride(1), q_out.stride(0), q_out.stride(1))
        hq = q.shape[1]
    else:
        cos = sin = k  # unused
        q_args = (k, k)  # unused
        q_strides = (0, 0, 0, 0)
        hq = 1
    if t == 0:
        return q_out
    _store_kernel[(t,)](
        q_args[0],
        k,
        v,
        cos,
        sin,
        slot_mapping,
        q_args[1],
        key_cache,
        value_cache,
        q_strides[0],
        q_strides[1],
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        cos.stride(0),
        sin.stride(0),
        q_strides[2],
        q_strides[3],
        *key_cache.stride()[:3],
        *value_cache.stride()[:3],
        HQ=hq,
        HKV=hkv,
        D=d,
        BLOCK_HQ=next_power_of_2(hq),
        BLOCK_HKV=next_power_of_2(hkv),
        BLOCK_D=next_power_of_2(d),
        HALF=d // 2,
        BLOCK_HALF=next_power_of_2(max(1, d // 2)),
        PAGE=key_cache.shape[1],
        ROPE=rope,
        num_warps=4,
    )
    return q_out if rope else None
