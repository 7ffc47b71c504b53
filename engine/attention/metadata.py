"""Per-step attention metadata, built once by the model runner and shared by every layer."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class AttentionMetadata:
    """Where the T rows of a flattened step come from and where their K/V go.

    Sequences are laid out back to back: sequence i owns rows `query_start[i] : query_start[i + 1]` and those rows
    are its tokens at positions `context_lens[i] - query_lens[i] ... context_lens[i] - 1`.

    Device tensors (what kernels and CUDA graphs read):
    slot_mapping:  [T] int64, cache slot of each row's K/V; -1 = a padding row (writes nothing)
    block_tables:  [B, max_blocks] int32, padded with 0
    context_lens:  [B] int64, tokens of each sequence in the cache after this step (cached + new); 0 = padding
    query_start:   [B + 1] int32, cumulative query lengths: sequence i owns rows query_start[i] : query_start[i+1]

    Host mirrors (for the eager reference path; a graph-replayed step must not depend on them):
    query_lens, context_lens_host: per-sequence lists; max_query_len: the longest query (1 = decode-only step)

    The Triton backend reads only the device tensors, plus `max_query_len` to pick its kernel (decode-only or
    unified) and the shapes (B = block_tables rows, T = slot_mapping length) for its grids.
    """

    slot_mapping: torch.Tensor
    block_tables: torch.Tensor
    context_lens: torch.Tensor
    query_lens: list[int]
    context_lens_host: list[int]
    query_start: torch.Tensor | None = None
    max_query_len: int = 0

    @property
    def num_seqs(self) -> int:
        return len(self.query_lens)

    @property
    def is_decode_only(self) -> bool:
        return self.max_query_len == 1
