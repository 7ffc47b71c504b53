"""Shared fixtures: tiny reference checkpoints (built once, cached outside the repo) and CPU settings."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from tests import reference

torch.set_num_threads(2)
if not torch.cuda.is_available():
    # Without a GPU the Triton kernels run in Triton's CPU interpreter. It must be on before any kernel is
    # defined (kernel modules are imported lazily, by the tests that use them, after this conftest).
    os.environ.setdefault("TRITON_INTERPRET", "1")


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
