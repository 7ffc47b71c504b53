"""bench/gpu_check.py's every non-GPU part: the whole script on the CPU with a tiny model (`--dry-run`), so the one
prepared GPU run does not spend its minutes on a typo."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_gpu_script_runs_every_section_on_the_cpu(tmp_path):
    proc = subprocess.run(
        [sys.executable, "bench/gpu_check.py", "--dry-run", "--out", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    (report,) = tmp_path.glob("gpu-check-*-dryrun.md")
    text = report.read_text()
    assert "FAILED" not in text, text
    for check in (
        "GEMM", "diag A", "diag C", "decode tiny-demo B=2", "e2e text", "identity: graph vs eager", "profile: engine",
        "vision tiny-demo", "prefill tiny-demo", "image chat (1 tiles", "image chat 2 requests", "prefill cap 128",
    ):  # fmt: skip
        assert check in text, check
