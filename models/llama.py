"""The Llama-3 decoder of PerceptionLM on a flattened (varlen) batch.

Standard Llama: RMSNorm, GQA attention without biases, rotate-half RoPE (HF weight layout), SwiGLU MLP, final
norm. All T tokens of all scheduled sequences are concatenated into one [T, H] tensor; which token attends to
which (and where keys and values are stored) is the business of the `Attention` object the caller passes in
(models/attention.py), so paged-KV backends plug in without touching this file.

Fused for speed, same math: q/k/v are one GEMM (`qkv_proj`) and gate/up another (`gate_up_proj`), see
models/merged_linear.py; every residual add is fused with the RMSNorm that follows it, and silu(gate) * up is
one op (models/fused_ops.py: one kernel each on CUDA, the reference torch ops elsewhere). A layer therefore
takes the previous layer's output and the residual stream separately and returns both. Per layer on CUDA with
the Triton attention backend: norm, qkv GEMM, RoPE + K/V store, attention (1-2), o GEMM, add + norm, gate/up
GEMM, silu * mul, down GEMM.

Module names match transformers' `LlamaModel` except for the two merged projections, whose checkpoint tensors
(`q_proj`, `k_proj`, `v_proj`; `gate_proj`, `up_proj`) the loader stacks into them.
"""

from __future__ import annotations

import torch
from torch import nn

from plm_serve.models.attention import Attention
from plm_serve.models.config import TextConfig
from plm_serve.models.fused_ops import add_rms_norm, rms_norm, silu_mul
from plm_serve.models.merged_linear import MergedLinear
from plm_serve.models.rope import LlamaRotaryEmbedding, apply_rotate_half


class RMSNorm(nn.Module):
    """x / rms(x) computed in fp32, cast back, then scaled (transformers `LlamaRMSNorm`, same op order)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)

    def add_forward(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(residual + x), residual + x): the residual add fused with this norm."""
        return add_rms_norm(x, residual, self.weight, self.eps)


class LlamaAttention(nn.Module):
    def __init__(self, cfg: TextConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.head_dim = cfg.head_dim
        h, hd, bias = cfg.hidden_size, cfg.head_dim, cfg.attention_bias
        parts = {
            "q_proj": self.num_heads * hd,
            "k_proj": self.num_kv_heads * hd,
            "v_proj": self.num_kv_heads * hd,
        }
        self.qkv_proj = MergedLinear(h, parts, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * hd, h, bias=bias)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attention: Attention
    ) -> torch.Tensor:
        t, hd = x.shape[0], self.head_dim  # x: [T, H]; cos/sin: [T, 1, hd]
        q, k, v = self.qkv_proj(x).split(self.qkv_proj.sizes, dim=-1)  # views of one [T, (nh + 2 nkv) hd]
        q = q.view(t, self.num_heads, hd)
        k = k.view(t, self.num_kv_heads, hd)
        v = v.view(t, self.num_kv_heads, hd)
        rotary = getattr(attention, "rotary", None)  # a backend that fuses RoPE into its K/V store
        if rotary is not None:
            out = rotary(self.layer_idx, q, k, v, cos, sin)
        else:
            out = attention(self.layer_idx, apply_rotate_half(q, cos, sin), apply_rotate_half(k, cos, sin), v)
        return self.o_proj(out.reshape(t, self.num_heads * hd))  # out: [T, nh, hd]


class LlamaMLP(nn.Module):
    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        h, ff, bias = cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias
        self.gate_up_proj = MergedLinear(h, {"gate_proj": ff, "up_proj": ff}, bias=bias)
        self.down_proj = nn.Linear(ff, h, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(silu_mul(self.gate_up_proj(x)))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg: TextConfig, layer_idx: int) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(cfg, layer_idx)
        self.mlp = LlamaMLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(
        self,
        x: torch.Tensor,
        residual: torch.Tensor | None,
        cos: torch.Tensor,
        sin: torch.Tensor,
        attention: Attention,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x: the previous layer's MLP output (or the embeddings, with residual None) -> (this layer's MLP
        output, the residual stream before it). The stream after the layer is their sum, which the next
        layer's input norm (or the final norm) computes: the same additions as x += attn(...); x += mlp(...)."""
        if residual is None:
            residual, h = x, self.input_layernorm(x)
        else:
            h, residual = self.input_layernorm.add_forward(x, residual)
        h = self.self_attn(h, cos, sin, attention)
        h, residual = self.post_attention_layernorm.add_forward(h, residual)
        return self.mlp(h), residual


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
        x, residual = inputs_embeds, None
        cos, sin = self.rotary_emb(positions, x.dtype)  # once per step, shared by all layers
        for layer in self.layers:
            x, residual = layer(x, residual, cos, sin, attention)
        return self.norm(x) if residual is None else self.norm.add_forward(x, residual)[0]
