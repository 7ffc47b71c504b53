"""The wheel is self-contained: installed (not editable) into a fresh environment, away from the checkout, it
serves the demo model from an empty cache, beside llama-models (whose wheel ships a top-level `models`).

The fresh environment takes its third-party packages from this one through a path entry (not a site directory,
so this environment's editable install of plm-serve is not visible there): only plm-serve itself is new.
"""

from __future__ import annotations

import json
import os
import site
import subprocess
import sys
import zipfile
from pathlib import Path

import httpx

from tests.server.live_server import free_port, wait_healthy

ROOT = Path(__file__).resolve().parents[1]


def build_wheel(out: Path) -> Path:
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "wheel",
        "--no-deps",
        "--no-build-isolation",
        "-q",
        "-w",
        str(out),
        str(ROOT),
    ]
    subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=out)
    (wheel,) = out.glob("plm_serve-*.whl")
    return wheel


def fresh_environment(folder: Path, wheel: Path) -> Path:
    """A new venv holding only the wheel; third-party packages come from this interpreter's site-packages."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(folder)], check=True)
    python = folder / "bin" / "python"
    purelib = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True, capture_output=True, text=True,
    ).stdout.strip()  # fmt: skip
    (Path(purelib) / "dependencies.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    install = [sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", str(wheel)]
    subprocess.run(install, check=True, capture_output=True, text=True)
    return python


def test_the_wheel_holds_one_package_and_its_data_files(tmp_path):
    names = zipfile.ZipFile(build_wheel(tmp_path)).namelist()
    top_level = {n.split("/")[0] for n in names if not n.startswith("plm_serve-")}
    assert top_level == {"plm_serve"}
    for data in (
        "plm_serve/configs/plm-1b.yaml",
        "plm_serve/configs/models/tiny-demo.json",
        "plm_serve/processors/plm_chat_template.jinja",
    ):
        assert data in names


def test_the_installed_wheel_serves_the_demo_from_an_empty_cache(tmp_path):
    python = fresh_environment(tmp_path / "venv", build_wheel(tmp_path))
    work = tmp_path / "elsewhere"  # not the checkout: nothing may come from the source tree
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PLM_API_KEY")}
    env["XDG_CACHE_HOME"] = str(tmp_path / "empty-cache")
    where = subprocess.run(
        [python, "-c", "import plm_serve.server as s, models; print(s.__file__); print(models.__file__)"],
        cwd=work, env=env, check=True, capture_output=True, text=True,
    ).stdout.split()  # fmt: skip
    assert Path(where[0]).is_relative_to(tmp_path / "venv")  # ours, from the wheel
    assert (Path(where[1]).parent / "llama3").is_dir()  # `models` is llama-models' own, beside ours
    port = free_port()
    cmd = [
        str(python.parent / "plm-serve"),
        "--port",
        str(port),
        "--device",
        "cpu",
        "--config",
        "tiny-random",
    ]
    with (tmp_path / "server.log").open("w") as log:
        proc = subprocess.Popen(cmd, cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        base_url = f"http://127.0.0.1:{port}"
        wait_healthy(base_url, 180, proc)
        body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3}
        reply = httpx.post(f"{base_url}/v1/chat/completions", json=body, timeout=60)
        assert reply.status_code == 200, reply.text
        assert json.loads(reply.text)["usage"]["completion_tokens"] >= 1
    finally:
        proc.kill()
        proc.wait(timeout=10)
    assert "RANDOM" in (tmp_path / "server.log").read_text()
