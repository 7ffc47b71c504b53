"""Tokenizer and processor files of the built-in demo checkpoint, written without transformers or the network.

The tokenizer is the real PLM one: Llama 3's tiktoken BPE from the `llama-models` package, converted offline
(tiktoken_convert.py). The other files are what transformers 5.x `save_pretrained` writes for PLM, so the
folder also loads with `AutoProcessor.from_pretrained`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from plm_serve.processors.chat_template import PLM_TEMPLATE_FILE
from plm_serve.processors.tiktoken_convert import convert_llama3_tokenizer

TOKENIZER_CONFIG: dict[str, Any] = {
    "backend": "tokenizers",
    "bos_token": "<|begin_of_text|>",
    "eos_token": "<|eot_id|>",
    "extra_special_tokens": [],
    "image_token": "<|image|>",
    "model_max_length": 11520,
    "pad_token": "<|end_of_text|>",
    "processor_class": "PerceptionLMProcessor",
    "tokenizer_class": "TokenizersBackend",
    "video_token": "<|video|>",
}

_NORMALIZE = {
    "do_convert_rgb": True,
    "do_normalize": True,
    "do_rescale": True,
    "do_resize": True,
    "image_mean": [0.5, 0.5, 0.5],
    "image_std": [0.5, 0.5, 0.5],
    "resample": 3,
    "rescale_factor": 1 / 255,
    "size": {"height": 448, "width": 448},
}


def processor_config(max_num_tiles: int = 36) -> dict[str, Any]:
    """processor_config.json of PLM as transformers 5.x saves it (docs/checkpoint-format.md)."""
    return {
        "image_processor": {
            **_NORMALIZE,
            "image_processor_type": "PerceptionLMImageProcessor",
            "max_num_tiles": max_num_tiles,
            "tile_size": 448,
            "vision_input_type": "thumb+tile",
        },
        "patch_size": 14,
        "pooling_ratio": 2,
        "processor_class": "PerceptionLMProcessor",
        "video_processor": {
            **_NORMALIZE,
            "do_center_crop": False,
            "return_metadata": False,
            "video_processor_type": "PerceptionLMVideoProcessor",
        },
    }


def write_processor_files(folder: str | Path, max_num_tiles: int = 36) -> Path:
    """Write tokenizer.json, tokenizer_config.json, chat_template.jinja, processor_config.json to `folder`."""
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    convert_llama3_tokenizer().save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(
        json.dumps(TOKENIZER_CONFIG, indent=2) + "\n", encoding="utf-8"
    )
    (out / "chat_template.jinja").write_text(PLM_TEMPLATE_FILE.read_text(encoding="utf-8"), encoding="utf-8")
    config = processor_config(max_num_tiles)
    (out / "processor_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return out
