"""Serving presets: YAML files of settings, given by path or by the name of one shipped in `plm_serve.configs`.

A preset is a mapping of setting names (server/flags.py) to values, flat or under `engine:` / `server:`
sections; every key and value is checked against its setting, so a typo or a wrong type is one clear line,
never a traceback.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

import yaml

from plm_serve import configs
from plm_serve.server.flags import SettingsError, settings


def load_preset(name_or_path: str) -> dict[str, Any]:
    """The checked settings of a preset: {setting name: value}."""
    text, where = _read(name_or_path)
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        problem = getattr(exc, "problem", None) or "not valid YAML"
        raise SettingsError(f"{where}: {problem}{at}") from None
    data = data or {}
    if not isinstance(data, dict):
        raise SettingsError(f"{where}: expected a mapping of settings, got {type(data).__name__}")
    flat: dict[str, Any] = {}
    for section in ("engine", "server"):
        part = data.pop(section, None) or {}
        if not isinstance(part, dict):
            raise SettingsError(f"{where}: the `{section}:` section must be a mapping of settings")
        flat.update(part)
    flat.update(data)
    return {key: _check(key, value, where) for key, value in flat.items()}


def _check(key: Any, value: Any, where: str) -> Any:
    known = settings()
    if key == "model":
        if not isinstance(value, str):
            raise SettingsError(f"{where}: model must be the path of a checkpoint folder, got {value!r}")
        return value
    if key not in known:
        close = difflib.get_close_matches(str(key), list(known), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise SettingsError(f"{where}: unknown setting {key!r}{hint}")
    return known[key].check(value, where)


def _read(name_or_path: str) -> tuple[str, str]:
    """(text, where) of a preset file, or of the shipped preset of that name."""
    path = Path(name_or_path)
    if path.is_file():
        try:
            return path.read_text(encoding="utf-8"), str(path)
        except (OSError, UnicodeDecodeError) as exc:
            raise SettingsError(f"{path}: cannot read the preset: {exc}") from None
    shipped = configs.serving_preset(name_or_path)
    if shipped is None:
        raise SettingsError(
            f"--config {name_or_path}: no such file, and no shipped preset of that name "
            f"(shipped: {', '.join(configs.serving_preset_names())})"
        )
    return shipped.read_text(encoding="utf-8"), f"preset {name_or_path}"
