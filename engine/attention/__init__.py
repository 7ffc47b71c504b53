"""Paged-KV attention backends. Each implements `models.attention.Attention` for one engine step."""

from engine.attention.kv_cache import KVCache
from engine.attention.metadata import AttentionMetadata
from engine.attention.torch_paged import TorchPagedAttention

__all__ = ["AttentionMetadata", "KVCache", "TorchPagedAttention"]
