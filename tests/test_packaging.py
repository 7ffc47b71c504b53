"""The installed project resolves to this checkout's packages from any working directory.

Guards against the llama-models wheel, which also ships a top-level package named `models`: installed into the
same environment it would shadow ours for the `plm-serve` console script (make installs it outside sys.path).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_packages_resolve_to_this_checkout_outside_the_repo(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    code = "import models, engine, server, processors, offline; print(models.__file__); models.PerceptionLM"
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert Path(out.stdout.strip()).resolve() == ROOT / "models" / "__init__.py"


def test_the_llama3_tokenizer_file_is_found_without_importing_llama_models():
    from processors.tiktoken_convert import llama3_tiktoken_file

    path = llama3_tiktoken_file()
    assert path.is_file() and path.stat().st_size > 1_000_000
    assert (
        "models" not in sys.modules
        or Path(sys.modules["models"].__file__).resolve().parent == ROOT / "models"
    )
