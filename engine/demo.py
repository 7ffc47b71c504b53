"""The built-in demo model: tiny, random, seeded. Lets the server start anywhere without a checkpoint."""

from __future__ import annotations

from pathlib import Path

from plm_serve.models import write_random_checkpoint


def write_demo_model(folder: str | Path, seed: int = 0) -> None:
    """Write config.json, generation_config.json and model.safetensors of the `tiny-demo` preset into `folder`."""
    write_random_checkpoint(Path(folder), preset="tiny-demo", seed=seed)
