"""Type-check the project with mypy, as the installed `plm_serve` namespace sees it.

The source folders are the `plm_serve.*` packages only through setuptools' `package-dir` mapping (an editable
install resolves them with an import hook mypy cannot follow), so this builds the same layout out of symlinks
under build/typecheck/ from pyproject.toml's own mapping and checks every package there.

    python tools/typecheck.py        # `make lint` runs it; extra arguments go to mypy
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TREE = ROOT / "build" / "typecheck"


def main() -> int:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    mapping: dict[str, str] = config["tool"]["setuptools"]["package-dir"]  # "plm_serve.engine" -> "engine"
    shutil.rmtree(TREE, ignore_errors=True)
    for package, folder in mapping.items():
        link = TREE.joinpath(*package.split("."))
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(ROOT / folder, link.parent), target_is_directory=True)
    packages = [arg for package in mapping for arg in ("-p", package)]
    env = {**os.environ, "MYPYPATH": str(TREE)}
    command = [sys.executable, "-m", "mypy", *packages, *sys.argv[1:]]
    return subprocess.run(command, cwd=ROOT, env=env, check=False).returncode


if __name__ == "__main__":
    sys.exit(main())
