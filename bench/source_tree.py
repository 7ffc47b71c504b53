"""Make `import plm_serve` work for a benchmark run from a checkout that was never pip-installed.

A GPU machine may offer torch but no way to install packages. The repository's folders become the subpackages of
the `plm_serve` namespace (as pyproject.toml maps them) through a throw-away folder of symlinks put on
`sys.path`. Where `plm_serve` is already importable (an installed or editable checkout) nothing changes.
"""

from __future__ import annotations

import importlib.util
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("server", "offline", "engine", "models", "processors", "configs")


def ensure_importable() -> None:
    if str(ROOT) not in sys.path:  # `tests.reference` and `bench.*` import from the repository root
        sys.path.insert(0, str(ROOT))
    if importlib.util.find_spec("plm_serve") is not None:
        return
    namespace = Path(tempfile.mkdtemp(prefix="plm-serve-src-")) / "plm_serve"
    namespace.mkdir()
    for name in PACKAGES:
        (namespace / name).symlink_to(ROOT / name, target_is_directory=True)
    sys.path.insert(0, str(namespace.parent))
