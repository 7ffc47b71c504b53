"""Fixtures for the processor tests: our Processor and transformers' reference on the same tiny checkpoint.

transformers objects are built once per session (the processor load takes seconds) and HF's slow image
processor is only run on small tile budgets or a handful of images.
"""

from __future__ import annotations

import functools
from pathlib import Path

import pytest

from plm_serve.processors import Processor
from tests import reference


@pytest.fixture(scope="session")
def processor(ckpt_l: Path) -> Processor:
    """Ours, loaded from the tiny checkpoint transformers saved (max_num_tiles = 4)."""
    return Processor.from_pretrained(ckpt_l)


@pytest.fixture(scope="session")
def hf_processor(ckpt_l: Path):
    """transformers' PerceptionLMProcessor loaded from the same folder."""
    return reference.load_hf_processor(ckpt_l)


@functools.cache
def hf_image_processor(max_num_tiles: int = 36, **kwargs):
    """A transformers image processor with the checkpoint's defaults (cached: building one is not free)."""
    from transformers import PerceptionLMImageProcessor

    return PerceptionLMImageProcessor(
        vision_input_type=kwargs.pop("vision_input_type", "thumb+tile"),
        tile_size=kwargs.pop("tile_size", 448),
        max_num_tiles=max_num_tiles,
        size={"height": 448, "width": 448},
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
        **kwargs,
    )
