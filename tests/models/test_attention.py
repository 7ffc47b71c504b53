"""The attention seam's reference pieces against a naive loop, and the decoder norm against its formula."""

from __future__ import annotations

import pytest
import torch

from plm_serve.models.attention import DenseCausalAttention, causal_sdpa


def naive(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_cached: int) -> torch.Tensor:
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    rows = []
    for i in range(q.shape[0]):
        n = num_cached + i + 1
        scores = torch.einsum("hd,nhd->hn", q[i], k[:n]) / q.shape[-1] ** 0.5
        rows.append(torch.einsum("hn,nhd->hd", scores.softmax(-1), v[:n]))
    return torch.stack(rows)


# 5 query rows: prefixes up to 10 take the CPU's padded-square flash path, longer ones the masked kernel.
@pytest.mark.parametrize("num_cached", [0, 1, 7, 10, 11, 30])
def test_causal_sdpa_with_a_cached_prefix_is_bottom_right_aligned(num_cached):
    gen = torch.Generator().manual_seed(num_cached)
    q = torch.randn(5, 4, 16, generator=gen)
    k = torch.randn(num_cached + 5, 2, 16, generator=gen)
    v = torch.randn(num_cached + 5, 2, 16, generator=gen)
    torch.testing.assert_close(causal_sdpa(q, k, v, num_cached=num_cached), naive(q, k, v, num_cached))


def test_dense_causal_attention_keeps_sequences_apart():
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(9, h, 8, generator=gen) for h in (4, 2, 2))
    out = DenseCausalAttention([4, 5])(0, q, k, v)
    torch.testing.assert_close(out[:4], naive(q[:4], k[:4], v[:4], 0))
    torch.testing.assert_close(out[4:], naive(q[4:], k[4:], v[4:], 0))


def test_rms_norm_is_transformers_formula():
    from plm_serve.models.llama import RMSNorm

    norm = RMSNorm(64, eps=1e-5)
    torch.nn.init.normal_(norm.weight)
    x = torch.randn(7, 64, generator=torch.Generator().manual_seed(1))
    xf = x.float()
    want = norm.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-5)).to(x.dtype)
    assert torch.equal(norm(x), want)
