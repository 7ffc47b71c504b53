"""Rotary position embeddings: 2D interleaved for the vision tower, 1D rotate-half (Llama-3) for the decoder.

Both reproduce the reference numerics: frequencies and angles in fp32, sin/cos cast to the activation dtype,
the rotation itself in the activation dtype (timm `RotaryEmbeddingCat` + `apply_rot_embed_cat`; transformers
`LlamaRotaryEmbedding` + `apply_rotary_pos_emb`).

Buffers are non-persistent (never in a checkpoint). A model built on the meta device gets them with
`reset_buffers()` once its parameters are materialized.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from plm_serve.models.config import RopeScaling, TextConfig, VisionConfig


def rotate_interleaved(x: torch.Tensor) -> torch.Tensor:
    """[x0, x1, x2, x3, ...] -> [-x1, x0, -x3, x2, ...] (pairs of adjacent channels)."""
    return torch.stack([-x[..., 1::2], x[..., ::2]], dim=-1).reshape(x.shape)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """[x_a, x_b] -> [-x_b, x_a] over the two halves of the last dim (HF's q_proj/k_proj layout)."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class VisionRope2D(nn.Module):
    """Fixed 2D RoPE table for one tile: `cos`, `sin` [num_prefix + grid^2, head_dim] in the model dtype.

    Patch (row r, col c) has coordinates x = c + offset, y = r + offset (scaled by ref/grid when
    `ref_feat_shape` is set); its angles are [x*f_0 .. x*f_{nb-1}, y*f_0 .. y*f_{nb-1}] (columns first) with
    f_j = temperature^(-j/nb), nb = head_dim/4, each angle repeated for an interleaved pair. Prefix (CLS) rows
    hold cos = 1, sin = 0: timm leaves the CLS token unrotated, and x*1 + rot(x)*0 == x exactly, so the whole
    sequence can be rotated in one op without slicing and concatenating.
    """

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.cfg = cfg
        n = cfg.num_prefix_tokens + cfg.grid_size**2
        self.cos: torch.Tensor
        self.sin: torch.Tensor
        self.register_buffer("cos", torch.empty(n, cfg.head_dim), persistent=False)
        self.register_buffer("sin", torch.empty(n, cfg.head_dim), persistent=False)
        self.reset_buffers()

    def reset_buffers(self) -> None:
        sin, cos = self._table(self.cos.device)
        self.cos.copy_(cos)
        self.sin.copy_(sin)

    def _table(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.cfg
        if device.type == "meta":
            shape = (cfg.num_prefix_tokens + cfg.grid_size**2, cfg.head_dim)
            return torch.empty(shape, device=device), torch.empty(shape, device=device)
        # Computed on the CPU in fp32 like timm (`_compute_bands`, `_build_grid`), then moved.
        nb = cfg.head_dim // 4
        bands = 1.0 / (cfg.rope_temperature ** (torch.arange(nb, dtype=torch.int64).to(torch.float32) / nb))
        g = cfg.grid_size
        coords = torch.arange(g, dtype=torch.int64).to(torch.float32) + cfg.rope_grid_offset  # [g]
        if cfg.ref_feat_shape is not None:
            ref_h, ref_w = cfg.ref_feat_shape
            xs, ys = coords / g * ref_w, coords / g * ref_h  # timm: x / feat * ref
        else:
            xs, ys = coords, coords
        y, x = torch.meshgrid(ys, xs, indexing="ij")  # [g, g] each, row-major patches
        angles = torch.stack([x, y], dim=-1).unsqueeze(-1) * bands  # [g, g, 2, nb]
        angles = angles.flatten(-2).flatten(0, 1)  # [g*g, 2*nb]: column bands, then row bands
        sin = angles.sin().repeat_interleave(2, dim=-1)  # [g*g, head_dim], interleaved pairs
        cos = angles.cos().repeat_interleave(2, dim=-1)
        prefix = cfg.num_prefix_tokens
        sin = torch.cat([torch.zeros(prefix, cfg.head_dim), sin])
        cos = torch.cat([torch.ones(prefix, cfg.head_dim), cos])
        return sin.to(device), cos.to(device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, heads, N, head_dim] with N = prefix + grid^2 -> same shape, rotated."""
        return x * self.cos + rotate_interleaved(x) * self.sin


def llama_inv_freq(head_dim: int, theta: float, scaling: RopeScaling | None) -> torch.Tensor:
    """Inverse frequencies [head_dim/2] in fp32, as transformers computes them (default or `llama3`)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).to(torch.float32) / head_dim))
    if scaling is None:
        return inv_freq
    # Llama 3.1 scaling: keep high frequencies, divide low ones by `factor`, interpolate smoothly in between.
    factor, low, high = scaling.factor, scaling.low_freq_factor, scaling.high_freq_factor
    old_len = scaling.original_max_position_embeddings
    low_freq_wavelen, high_freq_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


class LlamaRotaryEmbedding(nn.Module):
    """cos/sin [T, head_dim] for arbitrary positions; `inv_freq` stays fp32 whatever the model dtype."""

    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.register_buffer(
            "inv_freq", torch.empty(cfg.head_dim // 2, dtype=torch.float32), persistent=False
        )
        self.reset_buffers()

    def reset_buffers(self) -> None:
        if self.inv_freq.device.type != "meta":
            inv = llama_inv_freq(self.cfg.head_dim, self.cfg.rope_theta, self.cfg.rope_scaling)
            self.inv_freq.copy_(inv)

    def _apply(self, fn, *args, **kwargs):
        # `model.to(bfloat16)` casts every floating buffer; rounding inv_freq would change all angles
        # (transformers keeps it fp32 too), so put back an fp32 copy.
        super()._apply(fn, *args, **kwargs)
        if self.inv_freq.dtype != torch.float32:
            inv = llama_inv_freq(self.cfg.head_dim, self.cfg.rope_theta, self.cfg.rope_scaling)
            self.inv_freq = inv.to(self.inv_freq.device)
        return self

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions: [T] int -> (cos, sin), each [T, 1, head_dim] in `dtype` (broadcast over heads)."""
        freqs = positions[:, None].float() * self.inv_freq[None, :]  # [T, head_dim/2], fp32
        emb = torch.cat((freqs, freqs), dim=-1)  # [T, head_dim], rotate-half layout
        return emb.cos().to(dtype)[:, None, :], emb.sin().to(dtype)[:, None, :]


def apply_rotate_half(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [T, heads, head_dim]; cos/sin: [T, 1, head_dim]."""
    return x * cos + rotate_half(x) * sin
