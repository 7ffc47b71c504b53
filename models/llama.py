"""The Llama-3 decoder of PerceptionLM on a flattened (varlen) batch.

Standard Llama: RMSNorm, GQA attention without biases, rotate-half RoPE (HF weight layout), SwiGLU MLP, final
norm. All T tokens of all scheduled sequences are concatenated into one [T, H] tensor; which token attends to
which (and where keys and values are stored) is the business of the `Attention` object the caller passes in
(models/attention.py), so paged-KV backends plug in without touching this file. Names match transformers'
`LlamaModel`, so `model.language_model.*` checkpoint tensors load one-to-one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from plm_serve.models.attention import Attention
from plm_serve.models.config import TextConfig
from plm_serve.models.rope import LlamaRotaryEmbedding, apply_rotate_half


class RMSNorm(nn.Module):
    """x / rms(x) computed in fp32, cast back, then scaled (transformers `LlamaRMSNorm`, same op order)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # F.rms_norm is x * rsqrt(mean(x^2) + eps): the same math (bit-identical on CPU, where it decomposes
        # into those ops), but one fused kernel on CUDA instead of six launches per norm.
        normed = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        return self.weight * normed.to(x.dtype)


class LlamaAttention(nn.Module):
    def __init__(self, cfg: TextConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.head_dim = cfg.head_dim
        h, hd, bias = cfg.hidden_size, cfg.head_dim, cfg.attention_bias
        self.q_proj = nn.Linear(h, self.num_heads * hd, bias=bias)
        self.k_proj = nn.Linear(h, self.num_kv_heads * hd, bias=bias)
        self.v_proj = nn.Linear(h, self.num_kv_heads * hd, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * hd, h, bias=bias)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attention: Attention
    ) -> torch.Tensor:
        t = x.shape[0]  # x: [T, H]; cos/sin: [T, 1, hd]
        q = apply_rotate_half(self.q_proj(x).view(t, self.num_heads, self.head_dim), cos, sin)  # [T, nh, hd]
        k = apply_rotate_half(
            self.k_proj(x).view(t, self.num_kv_heads, self.head_dim), cos, sin
        )  # [T, nkv, hd]
        v = self.v_proj(x).view(t, self.num_kv_heads, self.head_dim)  # [T, nkv, hd]
        out = attention(self.layer_idx, q, k, v)  # [T, nh, hd]
        return self.o_proj(out.reshape(t, self.num_heads * self.head_dim))


class LlamaMLP(nn.Module):
    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        h, ff, bias = cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias
        self.gate_proj = nn.Linear(h, ff, bias=bias)
        self.up_proj = nn.Linear(h, ff, bias=bias)
        self.down_proj = nn.Linear(ff, h, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg: TextConfig, layer_idx: int) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(cfg, layer_idx)
        self.mlp = LlamaMLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attention: Attention
    ) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, attention)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    """Token embedding + decoder layers + final norm (no LM head)."""

    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary_emb = LlamaRotaryEmbedding(cfg)

    def forward(
        self, inputs_embeds: torch.Tensor, positions: torch.Tensor, attention: Attention
    ) -> torch.Tensor:
        """inputs_embeds [T, H], positions [T] -> final-normed hidden states [T, H]."""
        x = inputs_embeds
        cos, sin = self.rotary_emb(positions, x.dtype)  # once per step, shared by all layers
        for layer in self.layers:
            x = layer(x, cos, sin, attention)
        return self.norm(x)
