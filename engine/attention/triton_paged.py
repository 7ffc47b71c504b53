"""Paged attention through Triton kernels: the CUDA fast path of `models.attention.Attention`.

Per layer, at most three launches and no gather:
1. `store_kv`: rotate q and k (when the decoder hands them over before RoPE, see `rotary`) and write k/v to
   their slots; padding rows (slot -1) write nothing;
2. attention over the pool in place: `paged_decode` (split-K, then its merge) when every sequence of the step
   has one query, else `paged_prefill` over the whole flattened step (prefill chunks with or without a cached
   prefix, and decode rows, in one launch).

What the kernels read comes from the step's device tensors only (slot_mapping, block_tables, context_lens,
query_start); from the host side the backend uses shapes and `max_query_len` (which kind of step this is), so
a decode step can be captured in a CUDA graph and replayed with other contexts. The split count and its
scratch are fixed when the backend is built (once per step, shared by all layers).
"""

from __future__ import annotations

import functools
import itertools

import torch

from plm_serve.engine.attention.kv_cache import KVCache
from plm_serve.engine.attention.kv_store import store_kv
from plm_serve.engine.attention.metadata import AttentionMetadata
from plm_serve.engine.attention.paged_decode import DecodeWorkspace, choose_num_splits, paged_decode
from plm_serve.engine.attention.paged_prefill import paged_prefill

DEFAULT_NUM_SMS = 132  # H200; used where the device cannot be asked (the CPU interpreter)


@functools.cache
def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return DEFAULT_NUM_SMS
    return torch.cuda.get_device_properties(device).multi_processor_count


class TritonPagedAttention:
    """One step's attention over the paged KV pool with the Triton kernels.

    `num_splits`: split-K factor of decode-only steps (default: `choose_num_splits` for this batch size).
    Calls: `rotary(layer, q, k, v, cos, sin)` with q/k before RoPE (what `models.llama` uses when present),
    or `backend(layer, q, k, v)` with RoPE already applied. q [T, Hq, D], k/v [T, Hkv, D], may be strided
    views with a contiguous last dim; returns [T, Hq, D].
    """

    # Its kernels read only the metadata's device tensors, and their grids depend only on shapes: a decode step
    # can be captured once per batch size and replayed with other block tables and context lengths.
    cuda_graph_safe = True

    def __init__(self, kv_cache: KVCache, metadata: AttentionMetadata, num_splits: int | None = None) -> None:
        self.kv = kv_cache
        self.meta = metadata
        self.decode_only = metadata.is_decode_only
        self.num_seqs = metadata.block_tables.shape[0]
        if metadata.query_start is None:  # built without it (older callers): derive it from the host lengths
            starts = [0, *itertools.accumulate(metadata.query_lens)]
            self.query_start = torch.tensor(starts, dtype=torch.int32, device=metadata.block_tables.device)
        else:
            self.query_start = metadata.query_start
        hkv = kv_cache.data.shape[4]
        self.num_splits = 1
        if self.decode_only:
            device = kv_cache.data.device
            self.num_splits = num_splits or choose_num_splits(self.num_seqs, hkv, _num_sms(device))
        self._workspace: DecodeWorkspace | None = None  # split-K scratch, made by the first layer

    def rotary(
        self,
        layer: int,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
    ) -> torch.Tensor:
        """q/k before RoPE, cos/sin [T, 1, D] (the decoder's tables): rotate, store and attend in one pass."""
        keys, values = self.kv.data[layer, 0], self.kv.data[layer, 1]  # [num_blocks, block_size, Hkv, D]
        q_rot = store_kv(k, v, keys, values, self.meta.slot_mapping, q=q, cos=cos, sin=sin)
        assert q_rot is not None
        return self._attend(q_rot, keys, values)

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        keys, values = self.kv.data[layer, 0], self.kv.data[layer, 1]
        store_kv(k, v, keys, values, self.meta.slot_mapping)
        if q.stride(-1) != 1:
            q = q.contiguous()
        return self._attend(q, keys, values)

    def _attend(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        meta = self.meta
        if self.decode_only:
            if self.num_splits > 1 and self._workspace is None:
                b, hq, d = q.shape
                self._workspace = DecodeWorkspace.allocate(b, hq, self.num_splits, d, q.device)
            return paged_decode(
                q,
                keys,
                values,
                meta.block_tables,
                meta.context_lens,
                num_splits=self.num_splits,
                workspace=self._workspace,
            )
        return paged_prefill(
            q,
            keys,
            values,
            meta.block_tables,
            meta.context_lens,
            self.query_start,
            max_query_len=meta.max_query_len or None,
        )
