"""The vision tower runs in tile-count buckets: padding a batch with blank tiles leaves the real tiles' features."""

from __future__ import annotations

import torch

from plm_serve.engine import EngineConfig
from plm_serve.engine.model_runner import ModelRunner, tile_buckets
from plm_serve.models import load_model


def test_bucket_sizes() -> None:
    assert tile_buckets(74) == [1, 2, 4, 8, *range(12, 73, 4), 74]
    assert tile_buckets(8) == [1, 2, 4, 8]
    assert tile_buckets(5) == [1, 2, 4, 5]
    assert tile_buckets(1) == [1]


def test_padded_buckets_give_the_unpadded_features(ckpt_l) -> None:
    model = load_model(ckpt_l, device="cpu", dtype=torch.float32)
    config = EngineConfig(model=str(ckpt_l), max_encoder_tiles_per_step=6, num_kv_blocks=8)
    runner = ModelRunner(model, config, torch.device("cpu"), torch.float32)
    assert runner.tile_buckets == [1, 2, 4, 6]
    pixels = torch.randint(
        0, 256, (5, 3, 448, 448), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
    )
    calls = []
    original = model.encode_media
    model.encode_media = lambda px: calls.append(px.shape[0]) or original(px)
    feats = runner.encode_tiles(pixels)  # one batch of 5 -> bucket 6 (one blank tile)
    assert calls == [6]
    with torch.inference_mode():
        want = torch.cat([original(model.normalize_pixels(pixels[i : i + 1])) for i in range(5)])
    torch.testing.assert_close(feats, want, rtol=1e-5, atol=1e-5)
