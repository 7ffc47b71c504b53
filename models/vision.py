"""The Perception Encoder ViT (timm `Eva` with `vit_pe_core_*` settings) as PerceptionLM runs it.

One 448x448 tile -> 32x32 patch tokens (+ a CLS token for the PE-L tower of PLM-1B/3B):
patch conv (no bias) -> [CLS] -> + learned absolute position embedding -> `norm_pre` -> blocks -> [norm].
Each block is pre-norm: x += gamma_1 * attn(norm1(x)); x += gamma_2 * mlp(norm2(x)); attention has a
fused qkv with bias, 2D RoPE on patch tokens only, and no mask. The output is the last block's (PLM ships
truncated towers: every block in the checkpoint is used, and there is no post-norm). Module and parameter
names match timm, so the checkpoint tensors `model.vision_tower.timm_model.*` load one-to-one
(docs/checkpoint-format.md).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from plm_serve.models.attention import no_cudnn_sdpa
from plm_serve.models.config import VisionConfig
from plm_serve.models.rope import VisionRope2D


class PatchEmbed(nn.Module):
    """Non-overlapping patch x patch convolution; with `norm_pre` the conv has no bias (timm)."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        p = cfg.patch_size
        self.proj = nn.Conv2d(3, cfg.embed_dim, kernel_size=p, stride=p, bias=not cfg.pre_norm)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels [B, 3, S, S] -> [B, (S/p)^2, D], patches in row-major order."""
        return self.proj(pixels).flatten(2).transpose(1, 2)


class VisionAttention(nn.Module):
    """Bidirectional multi-head attention with a fused qkv projection and 2D RoPE."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.num_heads = cfg.num_heads
        self.head_dim = cfg.head_dim
        self.qkv = nn.Linear(cfg.embed_dim, 3 * cfg.embed_dim, bias=cfg.qkv_bias)
        self.proj = nn.Linear(cfg.embed_dim, cfg.embed_dim)

    def forward(self, x: torch.Tensor, rope: VisionRope2D) -> torch.Tensor:
        b, n, d = x.shape  # [B, N, D]
        # qkv rows: q | k | v, heads contiguous in each; [B, N, 3, heads, hd] -> 3 x [B, heads, N, hd]
        q, k, v = self.qkv(x).view(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = rope(q), rope(k)
        with no_cudnn_sdpa():  # cuDNN would build a graph per new tile count
            out = F.scaled_dot_product_attention(q, k, v)  # no mask, scale head_dim^-0.5
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class VisionMlp(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(cfg.embed_dim, cfg.mlp_hidden)
        self.fc2 = nn.Linear(cfg.mlp_hidden, cfg.embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))  # exact (erf) GELU, as nn.GELU()


class VisionBlock(nn.Module):
    """Pre-norm transformer block with optional LayerScale (`gamma_1`, `gamma_2`)."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        d = cfg.embed_dim
        self.norm1 = nn.LayerNorm(d, eps=cfg.norm_eps)
        self.attn = VisionAttention(cfg)
        self.norm2 = nn.LayerNorm(d, eps=cfg.norm_eps)
        self.mlp = VisionMlp(cfg)
        layer_scale = cfg.init_values is not None
        self.gamma_1 = nn.Parameter(torch.empty(d)) if layer_scale else None
        self.gamma_2 = nn.Parameter(torch.empty(d)) if layer_scale else None

    def forward(self, x: torch.Tensor, rope: VisionRope2D) -> torch.Tensor:
        a = self.attn(self.norm1(x), rope)
        x = x + (self.gamma_1 * a if self.gamma_1 is not None else a)
        m = self.mlp(self.norm2(x))
        return x + (self.gamma_2 * m if self.gamma_2 is not None else m)


class PerceptionEncoder(nn.Module):
    """The PE vision tower: pixels [B, 3, S, S] (normalized) -> features [B, prefix + (S/p)^2, D]."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.embed_dim
        num_patches = cfg.grid_size**2
        self.patch_embed = PatchEmbed(cfg)
        self.cls_token = nn.Parameter(torch.empty(1, 1, d)) if cfg.class_token else None
        self.pos_embed = nn.Parameter(torch.empty(1, cfg.num_prefix_tokens + num_patches, d))
        self.rope = VisionRope2D(cfg)
        self.norm_pre = nn.LayerNorm(d, eps=cfg.norm_eps) if cfg.pre_norm else nn.Identity()
        self.blocks = nn.ModuleList(VisionBlock(cfg) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(d, eps=cfg.norm_eps) if cfg.post_norm else nn.Identity()

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(pixels)  # [B, P, D]
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)  # [B, 1 + P, D]
        x = self.norm_pre(x + self.pos_embed)  # the position embedding covers the CLS slot too
        for block in self.blocks:
            x = block(x, self.rope)
        return self.norm(x)
