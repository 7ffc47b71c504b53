"""Reference paged attention in plain PyTorch: runs anywhere, and is the oracle for faster kernels.

Each layer first scatters the step's new K/V into the pool at `slot_mapping`, then attends:
- decode rows (one query per sequence) in one batched SDPA over K/V gathered to [B, max_ctx] with a length mask;
- prefill chunks one sequence at a time with a causal mask offset by the tokens already cached.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from engine.attention.kv_cache import KVCache
from engine.attention.metadata import AttentionMetadata
from models.attention import causal_sdpa


class TorchPagedAttention:
    def __init__(self, kv_cache: KVCache, metadata: AttentionMetadata) -> None:
        self.kv = kv_cache
        self.meta = metadata
        bs = kv_cache.block_size
        # Slots of every cached token of every sequence, [B, max_ctx], and a validity mask: built once per step.
        max_ctx = max(metadata.context_lens_host)
        pos = torch.arange(max_ctx, device=metadata.block_tables.device)
        blocks = metadata.block_tables.long().gather(1, (pos // bs).expand(metadata.num_seqs, -1))
        self.ctx_slots = blocks * bs + pos % bs  # [B, max_ctx]
        self.ctx_valid = pos[None, :] < metadata.context_lens[:, None]  # [B, max_ctx]

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        keys, values = self.kv.keys(layer), self.kv.values(layer)  # [num_slots, Hkv, D]
        keys[self.meta.slot_mapping] = k
        values[self.meta.slot_mapping] = v
        if self.meta.is_pure_decode:
            return self._decode(q, keys, values)
        out = torch.empty_like(q)
        start = 0
        for i, (q_len, ctx_len) in enumerate(
            zip(self.meta.query_lens, self.meta.context_lens_host, strict=True)
        ):
            slots = self.ctx_slots[i, :ctx_len]
            rows = slice(start, start + q_len)
            out[rows] = causal_sdpa(q[rows], keys[slots], values[slots], num_cached=ctx_len - q_len)
            start += q_len
        return out

    def _decode(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        # q: [B, Hq, D] -> one query per sequence over its padded context [B, Hkv, max_ctx, D].
        k_ctx = keys[self.ctx_slots].transpose(1, 2)
        v_ctx = values[self.ctx_slots].transpose(1, 2)
        mask = self.ctx_valid[:, None, None, :]  # [B, 1, 1, max_ctx]
        out = F.scaled_dot_product_attention(q[:, :, None, :], k_ctx, v_ctx, attn_mask=mask, enable_gqa=True)
        return out[:, :, 0, :]
