"""The presets shipped inside the package, found by name with `importlib.resources` (a wheel holds them too).

- serving presets: `<name>.yaml` here (`plm-1b`, `plm-3b`, `plm-8b`, `tiny-random`), engine and server settings;
- model shapes: `models/<name>.json` (`plm-1b`, `plm-3b`, `plm-8b`, `tiny-demo`), the `config.json` of a
  checkpoint of that size, used to build random-weight models for the demo, tests and benchmarks.

This package holds data only and imports nothing else of the project.
"""

from __future__ import annotations

from importlib.resources import files
from importlib.resources.abc import Traversable

_ROOT = files(__name__)


def serving_preset_names() -> list[str]:
    return sorted(p.name.removesuffix(".yaml") for p in _ROOT.iterdir() if p.name.endswith(".yaml"))


def model_preset_names() -> list[str]:
    return sorted(
        p.name.removesuffix(".json") for p in _ROOT.joinpath("models").iterdir() if p.name.endswith(".json")
    )


def serving_preset(name: str) -> Traversable | None:
    """The shipped serving preset `name` (with or without `.yaml`), or None."""
    path = _ROOT.joinpath(name if name.endswith(".yaml") else f"{name}.yaml")
    return path if "/" not in name and path.is_file() else None


def model_preset(name: str) -> Traversable | None:
    """The shipped model shape `name` (with or without `.json`), or None."""
    path = _ROOT.joinpath("models", name if name.endswith(".json") else f"{name}.json")
    return path if "/" not in name and path.is_file() else None
