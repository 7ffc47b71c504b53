"""Random paged-attention steps for the kernel tests: a KV pool with scattered blocks, its metadata, and the
per-sequence reference (causal attention over each sequence's whole K/V with `causal_sdpa`)."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from plm_serve.engine.attention import AttentionMetadata, KVCache
from plm_serve.models.attention import causal_sdpa

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: the kernels run in Triton's interpreter


@dataclass
class PagedStep:
    """One layer of one step: sequences (tokens already cached, tokens in this step), then `pad_rows` graph
    padding rows (context 0, slot -1). The pool holds every sequence's history; q/k/v are the step's rows."""

    seqs: list[tuple[int, int]]
    pad_rows: int
    tables: list[list[int]]  # per sequence, its blocks in order
    cache: KVCache
    meta: AttentionMetadata
    q: torch.Tensor  # [T, Hq, D]
    k: torch.Tensor  # [T, Hkv, D], this step's keys (already rotated)
    v: torch.Tensor
    full_k: list[torch.Tensor]  # per sequence [cached + new, Hkv, D]
    full_v: list[torch.Tensor]

    def expected(self) -> torch.Tensor:
        """[T, Hq, D] in fp32: each sequence's rows over its whole context; padding rows zero."""
        outs = []
        start = 0
        for (cached, n), k, v in zip(self.seqs, self.full_k, self.full_v, strict=True):
            q = self.q[start : start + n].float()
            outs.append(causal_sdpa(q, k.float(), v.float(), num_cached=cached))
            start += n
        outs.append(torch.zeros(self.pad_rows, *self.q.shape[1:], device=self.q.device))
        return torch.cat(outs)

    def store_history(self) -> None:
        """Write the cached part of every sequence into the pool (what earlier steps did)."""
        keys, values = self.cache.keys(0), self.cache.values(0)
        for (cached, _), table, k, v in zip(self.seqs, self.tables, self.full_k, self.full_v, strict=True):
            slots = _slots(table, range(cached), self.cache.block_size)
            keys[slots], values[slots] = k[:cached], v[:cached]


def _slots(table: list[int], positions, block_size: int) -> torch.Tensor:
    slots = [table[p // block_size] * block_size + p % block_size for p in positions]
    return torch.tensor(slots, dtype=torch.long, device=DEVICE)


def paged_step(
    seqs: list[tuple[int, int]],
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    pad_rows: int = 0,
    block_size: int = 16,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    store_step: bool = True,
) -> PagedStep:
    """A step over randomly permuted blocks (so a sequence's blocks are scattered through the pool).

    store_step: also write this step's own K/V into the pool (what a backend does before attending), so the
    kernels can be called directly; False leaves them for the backend under test to store.
    """
    gen = torch.Generator().manual_seed(seed)
    need = [-(-(c + n) // block_size) for c, n in seqs]
    num_blocks = sum(need) + 3  # a few blocks nobody owns
    perm = torch.randperm(num_blocks, generator=gen).tolist()
    tables, it = [], iter(perm)
    for n in need:
        tables.append([next(it) for _ in range(n)])
    cache = KVCache.allocate(1, num_blocks, block_size, num_kv_heads, head_dim, dtype, DEVICE)
    cache.data.copy_(torch.randn(cache.data.shape, generator=gen).to(dtype))  # stale garbage everywhere
    full_k = [torch.randn(c + n, num_kv_heads, head_dim, generator=gen).to(dtype).to(DEVICE) for c, n in seqs]
    full_v = [torch.randn(c + n, num_kv_heads, head_dim, generator=gen).to(dtype).to(DEVICE) for c, n in seqs]
    t = sum(n for _, n in seqs) + pad_rows
    q = torch.randn(t, num_heads, head_dim, generator=gen).to(dtype).to(DEVICE)
    pad_k = torch.randn(pad_rows, num_kv_heads, head_dim, generator=gen).to(dtype).to(DEVICE)
    k = torch.cat([*(fk[c:] for (c, _), fk in zip(seqs, full_k, strict=True)), pad_k])
    v = torch.cat([*(fv[c:] for (c, _), fv in zip(seqs, full_v, strict=True)), pad_k.clone()])
    width = max(need)
    slot_list = [_slots(tb, range(c, c + n), block_size) for (c, n), tb in zip(seqs, tables, strict=True)]
    query_lens = [n for _, n in seqs] + [1] * pad_rows
    context = [c + n for c, n in seqs] + [0] * pad_rows
    meta = AttentionMetadata(
        slot_mapping=torch.cat([*slot_list, torch.full((pad_rows,), -1, device=DEVICE)]),
        block_tables=torch.tensor(
            [tb + [0] * (width - len(tb)) for tb in tables] + [[0] * width] * pad_rows,
            dtype=torch.int32,
            device=DEVICE,
        ),
        context_lens=torch.tensor(context, device=DEVICE),
        query_lens=query_lens,
        context_lens_host=context,
        query_start=torch.tensor([0, *itertools.accumulate(query_lens)], dtype=torch.int32, device=DEVICE),
        max_query_len=max(query_lens),
    )
    step = PagedStep(seqs, pad_rows, tables, cache, meta, q, k, v, full_k, full_v)
    step.store_history()
    if store_step:
        rows = slice(0, t - pad_rows)
        cache.keys(0)[meta.slot_mapping[rows]] = k[rows]
        cache.values(0)[meta.slot_mapping[rows]] = v[rows]
    return step
