"""Shared fixtures: tiny reference checkpoints (built once, cached outside the repo) and CPU settings."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests import reference

torch.set_num_threads(2)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device; run on a GPU machine (bench/gpu_check.py)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def ckpt_l() -> Path:
    """PE-L family (CLS token, grid offset 1), tied embeddings, llama3 RoPE scaling: the 1B/3B shape."""
    return reference.tiny_checkpoint(reference.PE_L)


@pytest.fixture(scope="session")
def ckpt_g() -> Path:
    """PE-G family (no CLS, grid offset 0), untied lm_head, plain RoPE: the 8B shape."""
    return reference.tiny_checkpoint(reference.PE_G)
