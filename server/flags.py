"""The settings a preset or a flag may set, derived from the config dataclasses (one place per default).

Each field of `EngineConfig`, `ServerConfig` and `MediaLimits` (ServerConfig's `media`) is one `Setting`: its
flag is `--field-name`, its help the field's docstring (read from the source with `ast`), its type the field's
annotation. Presets (server/presets.py) and flags are checked against the same list, so a new field is a new
flag and a new preset key with nothing else to write.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import itertools
import math
import textwrap
import types
import typing
from dataclasses import dataclass
from functools import cache
from typing import Any, Literal

from plm_serve.engine import EngineConfig
from plm_serve.processors import MediaLimits
from plm_serve.server.config import ServerConfig

# Fields that are not settings: the checkpoint comes from --model, the nested configs are groups of their own.
_NOT_SETTINGS = {"model", "engine", "media"}


# What an optional setting's flag takes for "unset" (`--default-max-tokens none`). argparse's own None means
# "flag not given", so the word parses to this marker and `given_flags` turns it into None.
NONE_WORD = "none"
_EXPLICIT_NONE = object()


class SettingsError(ValueError):
    """A preset or flag value that does not fit its setting (the CLI prints it as one line and exits)."""


@dataclass(frozen=True)
class Setting:
    name: str
    group: str  # "engine", "server" or "media": which config the value goes to
    kind: type  # bool, int, float or str
    optional: bool  # None is a valid value
    choices: tuple[str, ...] | None
    default: Any
    doc: str

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def check(self, value: Any, where: str) -> Any:
        """`value` (from YAML) if it has this setting's type; ints are accepted for floats."""
        if value is None and self.optional:
            return None
        ok = {
            bool: isinstance(value, bool),
            int: isinstance(value, int) and not isinstance(value, bool),
            float: isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value),
            str: isinstance(value, str),
        }[self.kind]
        if not ok:
            raise SettingsError(f"{where}: {self.name} must be {_describe(self.kind)}, got {value!r}")
        if self.choices is not None and value not in self.choices:
            raise SettingsError(f"{where}: {self.name}={value!r}: use one of {', '.join(self.choices)}")
        return float(value) if self.kind is float else value


def _describe(kind: type) -> str:
    return {bool: "true or false", int: "an integer", float: "a finite number", str: "a string"}[kind]


@cache
def settings() -> dict[str, Setting]:
    """Every setting by name, engine first (names are unique across the three configs)."""
    out: dict[str, Setting] = {}
    for group, cls in (("engine", EngineConfig), ("server", ServerConfig), ("media", MediaLimits)):
        docs = field_docs(cls)
        hints = typing.get_type_hints(cls, localns={"EngineConfig": EngineConfig, "MediaLimits": MediaLimits})
        for f in dataclasses.fields(cls):
            if f.name in _NOT_SETTINGS:
                continue
            assert f.name not in out, f"setting {f.name} is defined twice"
            kind, optional, choices = _kind(hints[f.name])
            default = f.default_factory() if f.default is dataclasses.MISSING else f.default  # type: ignore[operator]
            out[f.name] = Setting(f.name, group, kind, optional, choices, default, docs.get(f.name, ""))
    return out


def _kind(annotation: Any) -> tuple[type, bool, tuple[str, ...] | None]:
    """(base type, None allowed, Literal choices) of a field annotation."""
    args = typing.get_args(annotation)
    optional = isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union
    if optional:
        (annotation,) = [a for a in args if a is not type(None)]
    if typing.get_origin(annotation) is Literal:
        return str, optional, tuple(typing.get_args(annotation))
    if annotation not in (bool, int, float, str):
        raise TypeError(f"setting type {annotation!r} has no flag form")
    return annotation, optional, None


def field_docs(cls: type) -> dict[str, str]:
    """The docstrings written under a dataclass's fields (a string literal right after `name: type = ...`)."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs = {}
    for node, after in itertools.pairwise(body):
        is_doc = isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and is_doc:
            docs[node.target.id] = " ".join(str(after.value.value).split())
    return docs


def given_flags(args: argparse.Namespace) -> dict[str, Any]:
    """The settings given on the command line: {name: value}, `none` given as None."""
    known = settings()
    return {
        k: None if v is _EXPLICIT_NONE else v for k, v in vars(args).items() if k in known and v is not None
    }


def _flag_type(s: Setting) -> Any:
    """The argparse `type` of a setting's flag: its kind, plus the word `none` where None is allowed."""
    kind = str if s.choices else s.kind
    if not s.optional:
        return kind

    def parse(text: str) -> Any:
        return _EXPLICIT_NONE if text.lower() == NONE_WORD else kind(text)

    parse.__name__ = kind.__name__  # argparse names the type in its "invalid int value" message
    return parse


def add_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per setting, in groups. Every default is None: only flags given override the preset."""
    titles = {"engine": "engine", "server": "server", "media": "media limits (per request)"}
    groups = {name: parser.add_argument_group(title) for name, title in titles.items()}
    for s in settings().values():
        default = "unset" if s.default is None else s.default
        unset = f"; `{NONE_WORD}` unsets it" if s.optional and s.default is not None else ""
        help_text = f"{s.doc} (default: {default}{unset})".replace("%", "%%")
        group = groups[s.group]
        if s.kind is bool:
            group.add_argument(s.flag, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            metavar = None if s.choices else s.kind.__name__.upper()
            group.add_argument(
                s.flag, type=_flag_type(s), choices=s.choices, default=None, metavar=metavar, help=help_text
            )
