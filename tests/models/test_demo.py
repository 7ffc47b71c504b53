"""write_random_checkpoint: a seeded tiny-demo checkpoint that our loader and transformers both load."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from plm_serve.models import DenseCausalAttention, PLMConfig, build_model, load_model, write_random_checkpoint


def test_round_trip(tmp_path: Path) -> None:
    folder = write_random_checkpoint(tmp_path / "demo", seed=3)
    assert json.loads((folder / "generation_config.json").read_text()) == {
        "bos_token_id": 128000,
        "eos_token_id": [128001, 128009],
        "do_sample": False,
    }
    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        names = set(f.keys())
    assert "lm_head.weight" not in names  # tied, omitted like save_pretrained
    assert "model.vision_tower.timm_model.cls_token" in names and len(names) == 57

    loaded = load_model(folder)
    fresh = build_model(PLMConfig.from_preset("tiny-demo"), init="random", seed=3)
    assert loaded.config == PLMConfig.from_preset("tiny-demo")
    sd_loaded, sd_fresh = loaded.state_dict(), fresh.state_dict()
    assert sd_loaded.keys() == sd_fresh.keys()
    assert all(torch.equal(sd_loaded[k], sd_fresh[k]) for k in sd_loaded)
    other = write_random_checkpoint(tmp_path / "other", seed=4)
    assert not torch.equal(load_model(other).lm_head.weight, loaded.lm_head.weight)


@torch.inference_mode()
def test_transformers_loads_the_demo_checkpoint(tmp_path: Path) -> None:
    from tests.reference import load_hf_model

    folder = write_random_checkpoint(tmp_path / "demo", seed=0)
    ours, hf = load_model(folder), load_hf_model(folder)
    pixels = torch.rand(2, 3, 448, 448) * 2 - 1
    ref_feats = hf.model.get_image_features(pixels[None]).pooler_output
    assert (ours.encode_media(pixels) - ref_feats).abs().max().item() <= 1e-4
    ids = torch.tensor([128000, 128006, 882, 128007, 271, *[128002] * 512, 9906, 128009])
    ref = hf(input_ids=ids[None], pixel_values=pixels[None]).logits[0]
    assert (ours.logits_for_prompt(ids, pixels) - ref).abs().max().item() <= 1e-4
    # the engine's path: flattened batch of two sequences through one DenseCausalAttention
    text = torch.tensor([128000, 9906, 1917, 0, 11])
    embeds = ours.embed_tokens(torch.cat([text, text[:3]]))
    positions = torch.tensor([0, 1, 2, 3, 4, 0, 1, 2])
    hidden = ours(embeds, positions, DenseCausalAttention([5, 3]))
    ref_text = hf(input_ids=text[None]).logits[0]
    assert (ours.compute_logits(hidden[:5]) - ref_text).abs().max().item() <= 1e-4
    assert (ours.compute_logits(hidden[5:]) - ref_text[:3]).abs().max().item() <= 1e-4
