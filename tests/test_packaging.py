"""What pip installs is one package, `plm_serve`, resolving to this checkout from any working directory.

A research checkout or another wheel with a top-level `models` / `server` / `engine` package (llama-models ships
a `models` package, and it is one of our dependencies) must not shadow ours.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_packages_resolve_to_this_checkout_outside_the_repo(tmp_path):
    # A decoy top-level `models` package first on the path, as another project would put it there.
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "__init__.py").write_text("raise ImportError('decoy models package imported')\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    code = (
        "import plm_serve.models as m, plm_serve.server, plm_serve.engine, plm_serve.processors, "
        "plm_serve.offline, plm_serve.configs; print(m.__file__); m.PerceptionLM"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert Path(out.stdout.strip()).resolve() == ROOT / "models" / "__init__.py"


def test_the_llama3_tokenizer_file_is_found_in_the_llama_models_package():
    from plm_serve.processors.tiktoken_convert import llama3_tiktoken_file

    path = llama3_tiktoken_file()
    assert path.is_file() and path.stat().st_size > 1_000_000
    assert path.parent.parent.name == "llama_models"
