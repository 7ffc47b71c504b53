"""The built-in demo checkpoint: a tiny random-weight PerceptionLM with the real PLM tokenizer.

Built once per version into `<cache_root>/demo-<version>` (seeded, so every machine gets the same weights) and
reused afterwards. Its answers are meaningless; it exists so `make serve` works anywhere without a download.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

from plm_serve.engine import write_demo_model
from plm_serve.processors import write_processor_files
from plm_serve.server.version import VERSION

logger = logging.getLogger(__name__)

_MARKER = ".complete"
DEMO_SEED = 0


def demo_checkpoint(cache_root: Path | None = None) -> Path:
    """The demo checkpoint of this version, built on first use under `cache_root` (default ~/.cache/plm-serve).

    For the offline API: `LLM(model=demo_checkpoint())` runs anywhere, like the server without --model."""
    return ensure_demo_checkpoint(cache_root or Path.home() / ".cache" / "plm-serve", VERSION)


def ensure_demo_checkpoint(cache_root: Path, version: str) -> Path:
    """The folder of the demo checkpoint, building it first if this version has none yet."""
    folder = cache_root / f"demo-{version}"
    if (folder / _MARKER).exists():
        return folder
    logger.info("building the demo checkpoint (tiny, random weights) in %s", folder)
    tmp = folder.with_name(f"{folder.name}.tmp-{os.getpid()}")  # build aside, publish with one rename
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write_demo_model(tmp, seed=DEMO_SEED)
    write_processor_files(tmp)
    (tmp / _MARKER).write_text("ok\n")
    if (folder / _MARKER).exists():  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
        return folder
    shutil.rmtree(folder, ignore_errors=True)  # a partial folder from an interrupted build
    tmp.rename(folder)
    return folder
