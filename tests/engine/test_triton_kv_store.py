"""The Triton K/V store (+ RoPE) kernel against `index_put_` and `models.rope.apply_rotate_half`.

fp32 is compared bit for bit. In bf16 Triton's interpreter truncates fp32 -> bf16 casts where the GPU rounds to
nearest even, so on the CPU the bf16 rotation is checked to within one bf16 ulp (bit-exact on a GPU).
"""

from __future__ import annotations

import pytest
import torch

from plm_serve.engine.attention import KVCache
from plm_serve.engine.attention.kv_store import store_kv
from plm_serve.models.config import RopeScaling
from plm_serve.models.rope import apply_rotate_half, llama_inv_freq, rotate_half
from tests.engine.paged_steps import DEVICE

T, HQ, HKV = 6, 8, 2
SLOTS = [3, -1, 17, 40, -1, 63]  # -1: graph padding rows


def _inputs(head_dim: int, dtype: torch.dtype):
    """q/k/v as views of one fused projection output, and the decoder's cos/sin [T, 1, D] for llama3 RoPE."""
    gen = torch.Generator().manual_seed(head_dim)
    qkv = torch.randn(T, (HQ + 2 * HKV) * head_dim, generator=gen).to(dtype).to(DEVICE)
    q, k, v = qkv.split([HQ * head_dim, HKV * head_dim, HKV * head_dim], dim=-1)
    q, k, v = q.view(T, HQ, head_dim), k.view(T, HKV, head_dim), v.view(T, HKV, head_dim)
    inv = llama_inv_freq(head_dim, 5e5, RopeScaling(32.0, 1.0, 4.0, 8192)).to(DEVICE)
    positions = torch.tensor([0, 7, 100, 2047, 9000, 11519], device=DEVICE)
    freqs = positions[:, None].float() * inv[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return q, k, v, emb.cos().to(dtype)[:, None, :], emb.sin().to(dtype)[:, None, :]


def _pool(head_dim: int, dtype: torch.dtype) -> KVCache:
    cache = KVCache.allocate(1, 4, 16, HKV, head_dim, dtype, DEVICE)
    cache.data.fill_(7.0)  # a sentinel: padding rows must leave it
    return cache


def _expected_pool(cache: KVCache, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    want = cache.data.clone()
    slots = torch.tensor(SLOTS, device=DEVICE)
    real = slots >= 0
    want[0, 0].flatten(0, 1)[slots[real]] = k[real]
    want[0, 1].flatten(0, 1)[slots[real]] = v[real]
    return want


@pytest.mark.parametrize("head_dim", [64, 128])
def test_rope_and_store_fp32_bit_exact(head_dim: int) -> None:
    q, k, v, cos, sin = _inputs(head_dim, torch.float32)
    cache = _pool(head_dim, torch.float32)
    k_rot = apply_rotate_half(k, cos, sin)
    want = _expected_pool(cache, k_rot, v)
    slots = torch.tensor(SLOTS, device=DEVICE)
    q_rot = store_kv(k, v, cache.data[0, 0], cache.data[0, 1], slots, q=q, cos=cos, sin=sin)
    assert torch.equal(q_rot, apply_rotate_half(q, cos, sin))
    assert torch.equal(cache.data, want)  # padding rows wrote nothing: the sentinel is intact elsewhere


def test_rope_and_store_bf16_within_an_ulp() -> None:
    q, k, v, cos, sin = _inputs(64, torch.bfloat16)
    cache = _pool(64, torch.bfloat16)
    want = _expected_pool(cache, apply_rotate_half(k, cos, sin), v)
    slots = torch.tensor(SLOTS, device=DEVICE)
    q_rot = store_kv(k, v, cache.data[0, 0], cache.data[0, 1], slots, q=q, cos=cos, sin=sin)
    _assert_within_roundings(q_rot, q, cos, sin)
    real = torch.tensor(SLOTS, device=DEVICE) >= 0
    stored = cache.data[0, 0].flatten(0, 1)[slots[real]]
    _assert_within_roundings(stored, k[real], cos[real], sin[real])
    assert torch.equal(cache.data[0, 1], want[0, 1])  # values are copied, not computed
    untouched = torch.ones_like(cache.data[0, 0].flatten(0, 1)[:, 0, 0], dtype=torch.bool)
    untouched[slots[real]] = False
    assert (cache.data[0, 0].flatten(0, 1)[untouched] == 7.0).all()


def _assert_within_roundings(
    got: torch.Tensor, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> None:
    """|got - reference| <= one bf16 ulp of each of the three values the reference rounds (two products and
    their sum), bounded by 2^-7 * (|x cos| + |rot(x) sin|) each."""
    want = apply_rotate_half(x, cos, sin).float()
    xf, cf, sf = x.float(), cos.float(), sin.float()
    bound = 3 * 2.0**-7 * (xf.abs() * cf.abs() + rotate_half(xf).abs() * sf.abs()) + 1e-6
    assert ((got.float() - want).abs() <= bound).all()


def test_store_without_rope() -> None:
    _, k, v, _, _ = _inputs(64, torch.float32)
    cache = _pool(64, torch.float32)
    want = _expected_pool(cache, k, v)
    assert store_kv(k, v, cache.data[0, 0], cache.data[0, 1], torch.tensor(SLOTS, device=DEVICE)) is None
    assert torch.equal(cache.data, want)
