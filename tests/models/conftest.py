"""Fixtures for the model tests: the tiny reference checkpoints loaded by transformers and by our loader, and
processor-made inputs (one image, two images, video frames) shared by the parity tests."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from plm_serve.models import PerceptionLM, load_model
from tests import reference


@dataclass
class Family:
    """One tiny checkpoint with both implementations loaded (fp32, CPU)."""

    name: str
    path: Path
    hf: Any  # transformers PerceptionLMForConditionalGeneration
    processor: Any
    ours: PerceptionLM


@pytest.fixture(scope="module", params=["L", "G"])
def family(request: pytest.FixtureRequest) -> Family:
    """Parametrized over both families: "L" (PE-L, CLS, tied, llama3 RoPE) and "G" (PE-G, no CLS, untied)."""
    path = request.getfixturevalue("ckpt_l" if request.param == "L" else "ckpt_g")
    return Family(
        name=request.param,
        path=path,
        hf=reference.load_hf_model(path),
        processor=reference.load_hf_processor(path),
        ours=load_model(path),
    )


def random_image(seed: int, width: int = 400, height: int = 300) -> Image.Image:
    """A smooth random RGB image (noise would make the resize kernel, not the model, dominate differences)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (height // 20, width // 20, 3), dtype=np.uint8)
    return Image.fromarray(small).resize((width, height), Image.BILINEAR)


def random_video(seed: int, frames: int = 3) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (frames, 120, 160, 3), dtype=np.uint8)


def chat_inputs(processor: Any, media: list[dict[str, Any]], text: str) -> dict[str, torch.Tensor]:
    """The processor's own tokenization of a one-turn chat: input_ids [1, S] and pixel tensors."""
    conversation = [{"role": "user", "content": [*media, {"type": "text", "text": text}]}]
    return dict(
        processor.apply_chat_template(
            conversation, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
        )
    )


PROMPTS = {
    "one_image": lambda: ([{"type": "image", "image": random_image(1)}], "Describe the image."),
    "two_images": lambda: (
        [{"type": "image", "image": random_image(2)}, {"type": "image", "image": random_image(3)}],
        "Compare the two images.",
    ),
    "video": lambda: ([{"type": "video", "video": random_video(4)}], "What happens in the video?"),
}


@pytest.fixture(scope="module")
def prompt_inputs(family: Family) -> dict[str, dict[str, torch.Tensor]]:
    """Processor outputs for each entry of PROMPTS, made once per family."""
    out = {}
    for name, make in PROMPTS.items():
        media, text = make()
        out[name] = chat_inputs(family.processor, media, text)
    return out
