"""Paged-KV attention backends. Each implements `models.attention.Attention` for one engine step."""

from plm_serve.engine.attention.kv_cache import KVCache
from plm_serve.engine.attention.metadata import AttentionMetadata
from plm_serve.engine.attention.torch_paged import TorchPagedAttention

__all__ = ["AttentionMetadata", "KVCache", "TorchPagedAttention"]
