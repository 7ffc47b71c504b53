"""Vision -> text projector: Linear -> GELU (erf) -> Linear on every patch token, then 2D average pooling.

With `projector_pooling_ratio` 2 the 32x32 patch grid of a tile becomes 16x16 = 256 decoder tokens; a ratio <=
1 means no pooling (transformers `PerceptionLMMultiModalProjector` + `PerceptionLMAdaptiveAvgPooling`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class MultiModalProjector(nn.Module):
    """features [N, P, Dv] (P = grid^2 patch tokens, row-major) -> [N, (grid/ratio)^2, H]."""

    def __init__(self, vision_dim: int, text_dim: int, pooling_ratio: int) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(vision_dim, text_dim)
        self.linear_2 = nn.Linear(text_dim, text_dim)
        self.pooling_ratio = pooling_ratio

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        x = self.linear_2(F.gelu(self.linear_1(features)))  # [N, P, H]
        if self.pooling_ratio <= 1:
            return x
        n, p, h = x.shape
        side = math.isqrt(p)
        if side * side != p:
            raise ValueError(f"num_tokens {p} is expected to be a square number")
        out = side // self.pooling_ratio
        grid = x.permute(0, 2, 1).reshape(n, h, side, side)  # [N, H, side, side]
        pooled = F.adaptive_avg_pool2d(grid, (out, out))  # [N, H, out, out]; 2x2 means for ratio 2
        return pooled.flatten(2).transpose(1, 2)  # [N, out*out, H], row-major
