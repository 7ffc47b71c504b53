"""The paged KV pool: one tensor holding every block of every layer."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class KVCache:
    """`data` is [num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim]; index 0 = keys, 1 = values.

    A token at position p of a sequence lives in slot `block_table[p // block_size] * block_size + p % block_size`;
    `keys(layer)` / `values(layer)` view a layer's pool as [num_slots, num_kv_heads, head_dim] for slot indexing.
    """

    data: torch.Tensor

    @classmethod
    def allocate(
        cls,
        num_layers: int,
        num_blocks: int,
        block_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> KVCache:
        shape = (num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim)
        return cls(torch.zeros(shape, dtype=dtype, device=device))

    @staticmethod
    def bytes_per_block(
        num_layers: int, block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype
    ) -> int:
        return num_layers * 2 * block_size * num_kv_heads * head_dim * dtype.itemsize

    @property
    def num_blocks(self) -> int:
        return self.data.shape[2]

    @property
    def block_size(self) -> int:
        return self.data.shape[3]

    def keys(self, layer: int) -> torch.Tensor:
        return self.data[layer, 0].flatten(0, 1)

    def values(self, layer: int) -> torch.Tensor:
        return self.data[layer, 1].flatten(0, 1)
