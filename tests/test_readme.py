"""The README's code blocks run as a new user pastes them: against the demo server that `make serve` starts.

Every ```bash / ```python block runs unless its info string names why it cannot here:
  setup            the README's own set-up commands (`make serve`, `make test`: this suite is one of them)
  real-checkpoint  needs a real PerceptionLM checkpoint folder (or a GPU)
  docker           needs a Docker engine
  kubernetes       needs a Kubernetes cluster
  benchmark        a benchmark run of minutes (tests/bench exercises the same command briefly)
The server runs on a free loopback port instead of 8000 (the blocks' URLs are rewritten), with a fresh cache, so
the demo checkpoint is built the way a first `make serve` builds it.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.server.live_server import free_port, start_server

ROOT = Path(__file__).resolve().parents[1]
SKIP_TAGS = {"setup", "real-checkpoint", "docker", "kubernetes", "benchmark"}
BLOCK = re.compile(r"^```(\w+)([^\n]*)\n(.*?)^```", re.M | re.S)


def readme_blocks() -> list[tuple[str, set[str], str]]:
    """(language, tags, code) of every fenced block in README.md."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    return [(m[1], set(m[2].split()), m[3]) for m in BLOCK.finditer(text)]


def test_every_code_block_runs_here_or_says_why_not():
    for language, tags, code in readme_blocks():
        if language in ("bash", "python"):
            assert tags <= SKIP_TAGS, f"unknown README block tag(s) {tags - SKIP_TAGS}: {code[:60]!r}"
    runnable = [b for b in readme_blocks() if b[0] in ("bash", "python") and not b[1]]
    assert {b[0] for b in runnable} == {"bash", "python"}


@pytest.fixture(scope="module")
def demo_server(tmp_path_factory):
    home = tmp_path_factory.mktemp("home")
    env = {**os.environ, "HOME": str(home), "XDG_CACHE_HOME": str(home / ".cache")}
    env.pop("PLM_API_KEY", None)
    port = free_port()
    with start_server(["--port", str(port), "--device", "cpu"], env, home / "server.log") as base_url:
        yield base_url, env, home


def test_the_readme_blocks_run_against_the_demo_server(demo_server):
    base_url, env, home = demo_server
    ran = 0
    for language, tags, code in readme_blocks():
        if language not in ("bash", "python") or tags:
            continue
        code = code.replace("http://127.0.0.1:8000", base_url)
        cmd = ["bash", "-euo", "pipefail", "-c", code] if language == "bash" else [sys.executable, "-c", code]
        out = subprocess.run(cmd, cwd=home, env=env, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, (
            f"README {language} block failed:\n{code}\n--- stderr:\n{out.stderr[-3000:]}"
        )
        assert out.stdout.strip(), f"README {language} block printed nothing:\n{code}"
        if 'stream": true' in code:
            assert "data: [DONE]" in out.stdout
        ran += 1
    assert ran >= 3
