"""bench/gpu_kernels.py without a GPU: its roofline arithmetic, and every section on tiny shapes through Triton's
interpreter (the numbers mean nothing there; the harness, shapes and reference comparisons are what is checked)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from bench import gpu_kernels as gk


def test_shapes_come_from_the_presets() -> None:
    assert gk.preset_shape("plm-1b") == gk.Shape("plm-1b", 32, 8, 64, 2048, 8192)
    assert gk.preset_shape("plm-8b") == gk.Shape("plm-8b", 32, 8, 128, 4096, 14336)


def test_roofline_arithmetic() -> None:
    one_b = gk.preset_shape("plm-1b")
    # B=256 at 2k context: 256 * 2048 tokens * (K + V) * 8 heads * 64 dims * 2 bytes = 1 GiB per layer
    assert gk.kv_bytes(256, 2048, one_b) == 2**30
    assert gk.roofline_seconds(2**30) == pytest.approx(2**30 / 4.3e12)
    # a decode token (no prefix) sees one key: QK^T and PV, 2 FLOPs per multiply-add, over 32 heads x 64 dims
    assert gk.attention_flops(0, 1, one_b) == 4 * 32 * 64
    assert gk.attention_flops(10, 2, one_b) == 4 * 32 * 64 * (10 + 10 + 1 + 2)
    assert gk.roofline_seconds(flops=790 * 10**12) == pytest.approx(1.0)


def test_tiny_run(tmp_path: Path) -> None:
    device = "cuda" if torch.cuda.is_available() else "cpu"  # a GPU machine compiles the kernels instead
    rows = gk.main(["--device", device, "--tiny", "--out", str(tmp_path)])
    failed = [r for r in rows if str(r["value"]).startswith("FAILED")]
    assert not failed, failed
    checks = " ".join(r["check"] for r in rows)
    for section in (
        "decode",
        "CUDA graph",
        "prefill",
        "RMSNorm",
        "silu",
        "RoPE + K/V store",
        "decoder layer",
    ):
        assert section in checks
    assert all(r["rel_error"] < 2e-2 for r in rows if "rel_error" in r)  # bf16 kernels vs fp32 references
    (report,) = tmp_path.glob("gpu-kernels-*.md")
    assert "| decode tiny-g4-d64 B=1" in report.read_text()


def test_cpu_needs_tiny() -> None:
    with pytest.raises(SystemExit):
        gk.main(["--device", "cpu"])
