"""The CPU benchmark commands run to their table (tiny sizes), so an engine change cannot silently break them.
(bench/gpu_check.py has its own dry run: tests/engine/test_gpu_check_dry_run.py.)"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    ("script", "args", "result"),
    [
        ("scheduler_overhead.py", ["--steps", "5", "--repeats", "1"], "scheduler-*-cpu.md"),
        ("structured_output.py", ["--steps", "3"], "structured-output-*-cpu.md"),
        ("preprocess.py", ["--rounds", "1", "--iters", "1"], "preprocess-*-cpu.md"),
    ],
)
def test_benchmark_writes_its_table(tmp_path, script, args, result):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / script), *args, "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (table,) = tmp_path.glob(result)
    assert "|---" in table.read_text()


def test_engine_throughput_compares_with_transformers(tmp_path):
    proc = subprocess.run(
        [
            sys.executable, str(ROOT / "bench" / "engine_throughput.py"), "--num-requests", "2",
            "--output-tokens", "3", "--skip-hf-solo", "--results", str(tmp_path),
        ],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (table,) = tmp_path.glob("engine-*.md")
    text = table.read_text()
    assert "Identical greedy outputs vs transformers: 2/2" in text and "| plm-serve engine" in text
