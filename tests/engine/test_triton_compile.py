"""Every Triton kernel compiles for the H200 (sm_90) as its launchers call it, without a GPU.

The interpreter that runs the kernel tests never compiles anything, so this compiles the recorded launches of a
PLM-1B-shaped decode and prefill step with the ptxas bundled with Triton (bench/triton_compile.py), in a fresh
process without TRITON_INTERPRET. The attention kernels must also keep their K/V loads software-pipelined
(async copies): losing that would cost most of their bandwidth without failing any numeric test.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_kernels_compile_for_sm90() -> None:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "triton_compile.py"), "--preset", "plm-1b", "--arch", "90"],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    kernels = {line.split()[1] for line in lines}
    assert kernels == {
        "_store_kernel",
        "_decode_split_kernel",
        "_decode_merge_kernel",
        "_prefill_kernel",
        "_rms_norm_kernel",
        "_silu_mul_kernel",
    }
    for line in lines:
        if "_decode_split_kernel" in line or "_prefill_kernel" in line:
            assert "pipelined loads: True" in line, line
