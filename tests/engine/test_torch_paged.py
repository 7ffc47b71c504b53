"""The torch paged-attention backend against plain causal attention over each sequence's whole K/V."""

from __future__ import annotations

import torch

from plm_serve.engine.attention import AttentionMetadata, KVCache, TorchPagedAttention
from plm_serve.models.attention import causal_sdpa

BS, HQ, HKV, D = 4, 4, 2, 8


def test_mixed_step_of_decodes_and_chunks_over_scattered_blocks():
    gen = torch.Generator().manual_seed(0)
    cache = KVCache.allocate(1, 32, BS, HKV, D, torch.float32, "cpu")
    # (tokens already cached, tokens in this step, block table): two decodes, a chunk over a cached prefix and
    # a first chunk.
    seqs = [
        (36, 1, [7, 3, 30, 1, 12, 9, 4, 20, 2, 5]),
        (20, 5, [11, 0, 25, 17, 6, 8, 13]),
        (2, 1, [31]),
        (0, 6, [14, 15]),
    ]
    full_k = [torch.randn(c + n, HKV, D, generator=gen) for c, n, _ in seqs]
    full_v = [torch.randn(c + n, HKV, D, generator=gen) for c, n, _ in seqs]
    slot = lambda table, p: table[p // BS] * BS + p % BS
    for (cached, _, table), k, v in zip(seqs, full_k, full_v, strict=True):
        for p in range(cached):  # history written by earlier steps
            cache.keys(0)[slot(table, p)] = k[p]
            cache.values(0)[slot(table, p)] = v[p]
    q = torch.randn(sum(n for _, n, _ in seqs), HQ, D, generator=gen)
    new_k = torch.cat([k[c:] for (c, _, _), k in zip(seqs, full_k, strict=True)])
    new_v = torch.cat([v[c:] for (c, _, _), v in zip(seqs, full_v, strict=True)])
    width = max(len(t) for _, _, t in seqs)
    meta = AttentionMetadata(
        slot_mapping=torch.tensor([slot(t, p) for c, n, t in seqs for p in range(c, c + n)]),
        block_tables=torch.tensor([t + [0] * (width - len(t)) for _, _, t in seqs], dtype=torch.int32),
        context_lens=torch.tensor([c + n for c, n, _ in seqs]),
        query_lens=[n for _, n, _ in seqs],
        context_lens_host=[c + n for c, n, _ in seqs],
    )
    out = TorchPagedAttention(cache, meta)(0, q, new_k, new_v)
    start = 0
    for (cached, n, _), k, v in zip(seqs, full_k, full_v, strict=True):
        want = causal_sdpa(q[start : start + n], k, v, num_cached=cached)
        torch.testing.assert_close(out[start : start + n], want)
        start += n
