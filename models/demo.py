"""A seeded random-weight checkpoint in the transformers layout, for the built-in demo and for tests.

`write_random_checkpoint` writes what `load_model` (and transformers' `from_pretrained`) read: `config.json`
(the preset, unchanged apart from `dtype`), `generation_config.json` and `model.safetensors` with HF tensor
names. The tokenizer and processor files belong to `processors/` and are written there.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from plm_serve.models.config import PLMConfig, load_preset_dict
from plm_serve.models.loader import build_model
from plm_serve.models.merged_linear import checkpoint_state

GENERATION_CONFIG = {"bos_token_id": 128000, "eos_token_id": [128001, 128009], "do_sample": False}


def write_random_checkpoint(
    folder: str | Path, preset: str = "tiny-demo", seed: int = 0, dtype: torch.dtype = torch.float32
) -> Path:
    """Write a random-weight model of `preset` (configs/models/<preset>.json, or a path) into `folder`.

    Weights are N(0, 0.02) (norms 1, biases 0, LayerScale 0.1), drawn on the CPU from `seed`; the tied
    `lm_head.weight` is omitted like `save_pretrained` does. Returns the folder.
    """
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    raw = load_preset_dict(preset)
    raw["dtype"] = str(dtype).removeprefix("torch.")  # "float32", "bfloat16", as transformers writes it
    config = PLMConfig.from_dict(raw)
    model = build_model(config, device="cpu", dtype=dtype, init="random", seed=seed)
    # transformers' tensor names (merged projections cut back into their parts); a tied lm_head is listed once,
    # under its first name (the embedding): what save_pretrained writes
    state = checkpoint_state(model)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(raw, indent=2) + "\n")
    (out / "generation_config.json").write_text(json.dumps(GENERATION_CONFIG, indent=2) + "\n")
    return out
