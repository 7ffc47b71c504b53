"""The checkpoint's chat template, rendered in a sandboxed jinja2 environment like transformers renders it.

Templates come with checkpoints, i.e. from the internet: they run in jinja2's `ImmutableSandboxedEnvironment`
and only ever see plain dicts, lists and strings (never request objects or bytes). The environment matches
transformers' (`trim_blocks`, `lstrip_blocks`, loop controls, `raise_exception`, `tojson`, `strftime_now`), so
templates render the same text.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.meta
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from plm_serve.processors.errors import CheckpointConfigError, InvalidContentError

PLM_TEMPLATE_FILE = Path(__file__).with_name("plm_chat_template.jinja")


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    value: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None, sort_keys=False
) -> str:
    # jinja's own tojson escapes HTML characters; chat templates expect plain JSON.
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


class ChatTemplate:
    """A compiled chat template: `render` turns template-ready messages (plain data) into the prompt text."""

    def __init__(self, source: str, special_tokens: dict[str, str]) -> None:
        self.source = source
        self._special_tokens = dict(special_tokens)
        env = _environment()
        try:
            self._template = env.from_string(source)
            variables = jinja2.meta.find_undeclared_variables(env.parse(source))
        except jinja2.TemplateSyntaxError as e:
            raise CheckpointConfigError(f"the chat template does not compile: {e}") from e
        # A template that reads `tools` renders tools, tool calls and tool results itself (transformers'
        # convention); for one that does not, the processor writes them in first (tool_prompt.py).
        self.renders_tools = "tools" in variables

    def render(
        self,
        messages: list[dict[str, Any]],
        *,
        add_generation_prompt: bool,
        tools: list[dict[str, Any]] | None = None,
    ) -> str:
        """Render; template errors (e.g. `raise_exception` on a role order it refuses) become
        InvalidContentError."""
        try:
            return self._template.render(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                tools=tools,
                **self._special_tokens,
            )
        except jinja2.TemplateError as e:
            raise InvalidContentError(
                f"the chat template rejected the messages: {e}", param="messages"
            ) from e
        except (TypeError, ValueError, KeyError, IndexError, AttributeError) as e:
            raise InvalidContentError(
                f"the chat template cannot render the messages: {e}", param="messages"
            ) from e


def load_chat_template(folder: Path, tokenizer_config: dict[str, Any]) -> str:
    """The template of a checkpoint: chat_template.jinja, chat_template.json, processor_config.json or
    tokenizer_config.json (in that order, as transformers looks for them). Falls back to the PLM template."""
    jinja_file = folder / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    for name in ("chat_template.json", "processor_config.json"):
        path = folder / name
        if path.is_file():
            try:
                value = json.loads(path.read_text(encoding="utf-8")).get("chat_template")
            except (OSError, ValueError, AttributeError) as e:
                raise CheckpointConfigError(f"cannot read {path}: {e}") from e
            if value:
                return _pick(value, path)
    if tokenizer_config.get("chat_template"):
        return _pick(tokenizer_config["chat_template"], folder / "tokenizer_config.json")
    return PLM_TEMPLATE_FILE.read_text(encoding="utf-8")


def _pick(value: Any, path: Path) -> str:
    """A template is a string, or a list of {"name", "template"} of which "default" is used."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        default = named.get("default")
        if isinstance(default, str):
            return default
    raise CheckpointConfigError(f"{path}: chat_template must be a string or a list with a 'default' entry")
