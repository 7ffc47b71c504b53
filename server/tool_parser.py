"""Tool calls out of the generated text (Llama 3.1 JSON convention, see processors/tool_prompt.py), incrementally.

The model writes `{"name": "f", "parameters": {...}}`, several calls separated by ";". One parser serves
streaming and non-streaming alike (the full response feeds the whole text at once), so the argument deltas of a
stream always concatenate to the final `arguments`:

  * Until the first non-blank character the text is held. `{` starts a tool call; anything else makes the
    whole output content, streamed as it comes. With tool_choice required or a named function the grammar
    guarantees calls, so the parser starts in the tool state.
  * As soon as `{"name": "<a known function>", "parameters": ` has arrived, the call is announced (its id and
    name, as OpenAI's first delta of a call), then the raw JSON text of the arguments streams as it is generated
    ("arguments" is accepted for "parameters"; a JSON-string value is decoded and sent once complete).
  * Output that is not in that layout but parses as calls in the end (keys in another order, say) is sent
    whole when the generation finishes; output that does not parse is content. Text after the last call that
    is not another call becomes content too.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field

_NAME = r'"((?:[^"\\]|\\.)*)"'
_HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*' + _NAME + r'\s*,\s*"(?:parameters|arguments)"\s*:\s*')
_CALL_END = re.compile(r"\s*\}")
_NEXT_CALL = re.compile(r"\s*;\s*")


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass
class ParsedCall:
    id: str
    name: str
    arguments: str = ""


@dataclass
class ToolEvent:
    """One thing to stream: content text, a new call (`call` set), or argument text of call `index`."""

    content: str | None = None
    index: int | None = None
    call: ParsedCall | None = None
    arguments: str | None = None


@dataclass
class ToolCallParser:
    """Feed text deltas of one choice; get content and tool-call events. `names`: the functions offered."""

    names: set[str]
    forced: bool = False  # tool_choice required / named: the output is calls
    calls: list[ParsedCall] = field(default_factory=list)
    content: str = ""
    _buffer: str = ""  # text of the tool state not consumed yet
    _mode: str = "undecided"  # undecided | content | tools
    _state: str = "head"  # head | args | tail (inside the tool state)
    _scan: _JsonScanner | None = None

    def __post_init__(self) -> None:
        if self.forced:
            self._mode = "tools"

    def feed(self, text: str) -> list[ToolEvent]:
        if self._mode == "content":
            return self._content(text)
        self._buffer += text
        if self._mode == "undecided":
            stripped = self._buffer.lstrip()
            if not stripped:
                return []
            if not stripped.startswith("{"):
                text, self._buffer = self._buffer, ""
                self._mode = "content"
                return self._content(text)
            self._mode = "tools"
        return self._advance(final=False)

    def finish(self) -> list[ToolEvent]:
        """At the end of the generation: whatever is still held, as calls or content."""
        if self._mode != "tools":
            text, self._buffer = self._buffer, ""
            return self._content(text)
        events = self._advance(final=True)
        rest, self._buffer = self._buffer, ""
        if not self.calls and rest.strip():  # not in the streamable layout: parse the whole output
            whole = _parse_whole(rest, self.names)
            if whole is not None:
                for call_name, arguments in whole:
                    events += self._announce(call_name)
                    events.append(self._arguments(arguments))
                return events
        if rest.strip() and self._state != "args":
            events += self._content(rest)
        return events

    @property
    def called(self) -> bool:
        return bool(self.calls)

    # ---------------------------------------------------------------------------------------------- internals
    def _content(self, text: str) -> list[ToolEvent]:
        if not text:
            return []
        self.content += text
        return [ToolEvent(content=text)]

    def _announce(self, name: str) -> list[ToolEvent]:
        call = ParsedCall(new_call_id(), name)
        self.calls.append(call)
        return [ToolEvent(index=len(self.calls) - 1, call=call)]

    def _arguments(self, text: str) -> ToolEvent:
        self.calls[-1].arguments += text
        return ToolEvent(index=len(self.calls) - 1, arguments=text)

    def _advance(self, final: bool) -> list[ToolEvent]:
        events: list[ToolEvent] = []
        while self._buffer:
            if self._state == "head":
                match = _HEAD.match(self._buffer)
                if match is None or _unescape(match.group(1)) not in self.names:
                    if match is not None or (self.calls and _cannot_be_head(self._buffer)):
                        events += self._give_up()
                    break
                events += self._announce(_unescape(match.group(1)))
                self._buffer = self._buffer[match.end() :]
                self._state, self._scan = "args", _JsonScanner()
            elif self._state == "args":
                assert self._scan is not None
                if not self._scan.started:  # blanks before the value are not part of the arguments
                    self._buffer = self._buffer.lstrip()
                    if not self._buffer:
                        break
                consumed = self._scan.feed(self._buffer)
                piece, self._buffer = self._buffer[:consumed], self._buffer[consumed:]
                if self._scan.is_string:  # a stringified object: sent decoded, once complete
                    if self._scan.done:
                        events.append(self._arguments(_decode_string(self._scan.text)))
                elif piece:
                    events.append(self._arguments(piece))
                if not self._scan.done:
                    break
                self._state = "tail"
            else:  # tail: "}" closes the call, then ";" may start another
                end = _CALL_END.match(self._buffer)
                if end is None:
                    if self._buffer.strip():
                        events += self._give_up()
                    break
                after = self._buffer[end.end() :]
                sep = _NEXT_CALL.match(after)
                if sep is not None:
                    self._buffer, self._state = after[sep.end() :], "head"
                elif after.strip() or final:
                    self._buffer = after
                    events += self._give_up() if after.strip() else []
                    break
                else:
                    break  # "}" with nothing after yet: wait for ";" or the end
        return events

    def _give_up(self) -> list[ToolEvent]:
        """The rest is not (or no longer) in the call layout: content after the calls made so far."""
        if not self.calls:
            return []  # maybe another layout: `finish` parses the whole output
        self._mode = "content"
        text, self._buffer = self._buffer, ""
        return self._content(text)


def _cannot_be_head(text: str) -> bool:
    """Whether `text` has gone past what could still become a call head."""
    stripped = text.lstrip()
    return len(text) > 256 or (bool(stripped) and not stripped.startswith("{"))


def _unescape(json_string_body: str) -> str:
    try:
        return json.loads(f'"{json_string_body}"')
    except ValueError:
        return json_string_body


def _decode_string(text: str) -> str:
    try:
        value = json.loads(text)
    except ValueError:
        return text
    return value if isinstance(value, str) else text


def _parse_whole(text: str, names: set[str]) -> list[tuple[str, str]] | None:
    """The calls of `text` if all of it is calls separated by ';', in any key order; else None."""
    decoder = json.JSONDecoder()
    calls, pos, text = [], 0, text.strip()
    while pos < len(text):
        try:
            value, pos = decoder.raw_decode(text, pos)
        except ValueError:
            return None
        arguments = value.get("parameters", value.get("arguments")) if isinstance(value, dict) else None
        if isinstance(arguments, str):
            arguments = _loads_object(arguments)
        if not isinstance(arguments, dict) or value.get("name") not in names:
            return None
        calls.append((value["name"], json.dumps(arguments, ensure_ascii=False)))
        sep = _NEXT_CALL.match(text, pos)
        pos = sep.end() if sep is not None else pos
        if sep is None and pos < len(text):
            return None
    return calls or None


def _loads_object(text: str) -> dict | None:
    try:
        value = json.loads(text)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


@dataclass
class _JsonScanner:
    """Finds where one JSON value ends in text that arrives in pieces (depth and string state only)."""

    text: str = ""
    depth: int = 0
    in_string: bool = False
    escaped: bool = False
    done: bool = False
    started: bool = False
    is_string: bool = False

    def feed(self, text: str) -> int:
        """Consume up to the end of the value; returns how many characters of `text` belong to it."""
        for i, ch in enumerate(text):
            if not self.started:
                if ch.isspace():
                    continue
                self.started, self.is_string = True, ch == '"'
            self.text += ch
            if self.in_string:
                if self.escaped:
                    self.escaped = False
                elif ch == "\\":
                    self.escaped = True
                elif ch == '"':
                    self.in_string = False
                    if self.depth == 0:
                        self.done = True
                        return i + 1
            elif ch == '"':
                self.in_string = True
            elif ch in "{[":
                self.depth += 1
            elif ch in "}]":
                self.depth -= 1
                if self.depth == 0:
                    self.done = True
                    return i + 1
        return len(text)
