"""GPU checks (skipped without CUDA): bf16 parity on the device, via bench/gpu_models.py."""

from __future__ import annotations

import pytest


@pytest.mark.gpu
def test_bf16_parity_on_cuda() -> None:
    from bench.gpu_models import parity_bf16

    report: list[dict] = []
    parity_bf16(report, device="cuda")
    assert report and all(r["ok"] for r in report), report
