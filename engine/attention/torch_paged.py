"""Reference paged attention in plain PyTorch: runs anywhere, and is the oracle for faster kernels.

Each layer first scatters the step's new K/V into the pool at `slot_mapping`, then attends:
- every decode row of the step (one query per sequence) in one batched SDPA over its sequence's K/V gathered
  to [B_decode, max_ctx] with a length mask, also when prefill chunks share the step;
- each prefill chunk with a causal mask offset by the tokens already cached.
Slot indices are computed once per step (here, in `__init__`) and shared by all layers.

The decode gather is padded to a multiple of `DECODE_CONTEXT_BUCKET` tokens (the length mask hides the padding)
and SDPA runs without cuDNN (`no_cudnn_sdpa`), so a context that grows by one token per step does not present a
new shape to an attention backend on every step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from plm_serve.engine.attention.kv_cache import KVCache
from plm_serve.engine.attention.metadata import AttentionMetadata
from plm_serve.models.attention import causal_sdpa, no_cudnn_sdpa

DECODE_CONTEXT_BUCKET = 256  # decode K/V are gathered to a multiple of this many positions


def context_slots(block_tables: torch.Tensor, num_positions: int, block_size: int) -> torch.Tensor:
    """[B, max_blocks] block tables -> [B, num_positions] cache slots of positions 0 .. num_positions - 1.

    Positions past the table's last block (padding of a bucketed gather) map into that block: real slots whose
    contents the caller masks out.
    """
    pos = torch.arange(num_positions, device=block_tables.device)
    block_index = (pos // block_size).clamp_max(block_tables.shape[1] - 1)
    blocks = block_tables.long().gather(1, block_index.expand(block_tables.shape[0], -1))
    return blocks * block_size + pos % block_size


class TorchPagedAttention:
    def __init__(self, kv_cache: KVCache, metadata: AttentionMetadata) -> None:
        self.kv = kv_cache
        self.meta = metadata
        bs, dev = kv_cache.block_size, metadata.block_tables.device
        starts = [0]
        for n in metadata.query_lens:
            starts.append(starts[-1] + n)
        decodes = [i for i, n in enumerate(metadata.query_lens) if n == 1]
        # Prefill chunks: (rows of the step, their sequence's cache slots [ctx_len], tokens already cached).
        self.prefills = [
            (
                slice(starts[i], starts[i + 1]),
                context_slots(metadata.block_tables[i : i + 1], ctx, bs)[0],
                ctx - n,
            )
            for i, (n, ctx) in enumerate(zip(metadata.query_lens, metadata.context_lens_host, strict=True))
            if n > 1
        ]
        self.decode_rows: torch.Tensor | None = None  # None: no decode rows
        if decodes:
            index = torch.tensor(decodes, device=dev)
            longest = max(metadata.context_lens_host[i] for i in decodes)
            max_ctx = -(-longest // DECODE_CONTEXT_BUCKET) * DECODE_CONTEXT_BUCKET
            self.decode_slots = context_slots(metadata.block_tables[index], max_ctx, bs)  # [B_dec, max_ctx]
            positions = torch.arange(max_ctx, device=dev)
            self.decode_valid = positions[None, :] < metadata.context_lens[index][:, None]  # [B_dec, max_ctx]
            pure = len(decodes) == metadata.num_seqs
            self.decode_rows = None if pure else torch.tensor([starts[i] for i in decodes], device=dev)
        self.has_decodes = bool(decodes)

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        keys, values = self.kv.keys(layer), self.kv.values(layer)  # [num_slots, Hkv, D]
        keys[self.meta.slot_mapping] = k
        values[self.meta.slot_mapping] = v
        if self.has_decodes and not self.prefills:
            return self._decode(q, keys, values)
        out = torch.empty_like(q)
        if self.has_decodes:
            out[self.decode_rows] = self._decode(q[self.decode_rows], keys, values)
        for rows, slots, num_cached in self.prefills:
            if num_cached == 0:  # the whole context is this step's own K/V: no need to read it back
                out[rows] = causal_sdpa(q[rows], k[rows], v[rows])
            else:
                out[rows] = causal_sdpa(q[rows], keys[slots], values[slots], num_cached=num_cached)
        return out

    def _decode(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        # q: [B, Hq, D], one query per sequence. The q heads that share a KV head become that head's G "query
        # positions": [B, Hkv, G, D] over K/V [B, Hkv, max_ctx, D]. Plain multi-head SDPA then covers GQA without
        # repeating K/V in memory (`enable_gqa` would send a masked call to the math kernel on CUDA).
        b, hq, d = q.shape
        hkv = keys.shape[1]
        k_ctx = keys[self.decode_slots].transpose(1, 2)
        v_ctx = values[self.decode_slots].transpose(1, 2)
        mask = self.decode_valid[:, None, None, :]  # [B, 1, 1, max_ctx]
        with no_cudnn_sdpa():
            out = F.scaled_dot_product_attention(
                q.reshape(b, hkv, hq // hkv, d), k_ctx, v_ctx, attn_mask=mask
            )
        return out.reshape(b, hq, d)
