"""OpenAI-style chat messages -> plain template data + the media parts in placeholder order.

Accepted: a non-empty list of {"role", "content"} dicts; roles system/developer (an alias of system), user,
assistant, tool; content a string, None (assistant turns without text) or a list of {"type": "text", "text": str}
dicts and `ImageInput` / `VideoInput` objects. An assistant message may carry OpenAI `tool_calls` and a tool
message its `tool_call_id`; they are kept as plain data in transformers' shape (arguments parsed into objects),
for the template or for `tool_prompt.py` to render. Deviation from the reference template, on purpose: a
plain-string content is one text part (the PLM template silently drops it), and a leading system message is
given to the template as one string (text parts joined with a newline), because the PLM template only renders
a string system prompt.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from plm_serve.processors.content import ImageInput, VideoInput
from plm_serve.processors.errors import InvalidContentError

_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant", "tool": "tool"}
_SURROGATE = re.compile("[\ud800-\udfff]")


@dataclass(frozen=True, slots=True)
class MediaPart:
    """A media part and where it was in the request."""

    part: ImageInput | VideoInput
    param: str  # e.g. "messages[1].content[0]"


@dataclass(frozen=True, slots=True)
class ParsedMessages:
    """Template-ready messages (plain data only) and the media, each kind in the order of its placeholders."""

    messages: list[dict[str, Any]]
    images: list[MediaPart]
    videos: list[MediaPart]


def parse_messages(messages: Any, forbidden_markers: tuple[str, ...]) -> ParsedMessages:
    """Validate and convert. `forbidden_markers` (the media placeholder strings) may not appear in text."""
    if not isinstance(messages, list) or not messages:
        raise InvalidContentError("messages must be a non-empty list", param="messages")
    out: list[dict[str, Any]] = []
    images: list[MediaPart] = []
    videos: list[MediaPart] = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise InvalidContentError("each message must be an object with 'role' and 'content'", param=where)
        role = _ROLES.get(message.get("role"))  # type: ignore[arg-type]
        if role is None:
            raise InvalidContentError(
                f"unsupported role {message.get('role')!r}: use system, user, assistant or tool",
                param=f"{where}.role",
            )
        parts = _parts(message.get("content"), f"{where}.content", forbidden_markers, images, videos)
        if role == "system" and i == 0:
            out.append({"role": role, "content": _text_only(parts, f"{where}.content", "a system message")})
        elif role == "tool":
            text = _text_only(parts, f"{where}.content", "a tool message")
            out.append(
                {
                    "role": role,
                    "content": [{"type": "text", "text": text}],
                    "tool_call_id": message.get("tool_call_id"),
                }
            )
        elif role == "assistant" and message.get("tool_calls"):
            calls = _tool_calls(message["tool_calls"], f"{where}.tool_calls")
            out.append({"role": role, "content": parts, "tool_calls": calls})
        else:
            out.append({"role": role, "content": parts})
    return ParsedMessages(out, images, videos)


def _tool_calls(calls: Any, where: str) -> list[dict[str, Any]]:
    """OpenAI `tool_calls` -> [{"id", "type": "function", "function": {"name", "arguments": object}}]."""
    if not isinstance(calls, list):
        raise InvalidContentError("tool_calls must be a list", param=where)
    out = []
    for j, call in enumerate(calls):
        at = f"{where}[{j}]"
        function = call.get("function") if isinstance(call, dict) else None
        name = function.get("name") if isinstance(function, dict) else None
        if not isinstance(name, str) or not name:
            raise InvalidContentError("a tool call needs function.name", param=f"{at}.function.name")
        assert isinstance(function, dict)  # a str name was read from it
        arguments = function.get("arguments", "{}")
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments or "{}")
            except ValueError:
                raise InvalidContentError(
                    "tool call arguments must be a JSON object", param=f"{at}.function.arguments"
                ) from None
        if not isinstance(arguments, dict):
            raise InvalidContentError(
                "tool call arguments must be a JSON object", param=f"{at}.function.arguments"
            )
        out.append(
            {"id": call.get("id"), "type": "function", "function": {"name": name, "arguments": arguments}}
        )
    return out


def _parts(
    content: Any,
    where: str,
    markers: tuple[str, ...],
    images: list[MediaPart],
    videos: list[MediaPart],
) -> list[dict[str, Any]]:
    if content is None:
        return []
    if isinstance(content, str):
        _check_text(content, where, markers)
        return [{"type": "text", "text": content}]
    if not isinstance(content, list):
        raise InvalidContentError("content must be a string or a list of content parts", param=where)
    parts: list[dict[str, Any]] = []
    for j, part in enumerate(content):
        at = f"{where}[{j}]"
        if isinstance(part, ImageInput):
            images.append(MediaPart(part, at))
            parts.append({"type": "image"})
        elif isinstance(part, VideoInput):
            videos.append(MediaPart(part, at))
            parts.append({"type": "video"})
        elif isinstance(part, dict) and part.get("type") == "text":
            text = part.get("text")
            if not isinstance(text, str):
                raise InvalidContentError("a text part needs a string 'text'", param=f"{at}.text")
            _check_text(text, at, markers)
            parts.append({"type": "text", "text": text})
        elif isinstance(part, dict):
            raise InvalidContentError(
                f"unsupported content part type {part.get('type')!r}: use text, image_url or video_url",
                param=at,
            )
        else:
            raise InvalidContentError("a content part must be an object with a 'type'", param=at)
    return parts


def _check_text(text: str, where: str, markers: tuple[str, ...]) -> None:
    if not text.isascii() and _SURROGATE.search(text):
        raise InvalidContentError("text is not valid Unicode (it has a lone surrogate)", param=where)
    for marker in markers:
        if marker in text:
            raise InvalidContentError(
                f"text may not contain the media placeholder {marker}; "
                "send media as image_url/video_url parts",
                param=where,
            )


def _text_only(parts: list[dict[str, Any]], where: str, what: str) -> str:
    if any(p["type"] != "text" for p in parts):
        raise InvalidContentError(f"{what} may contain only text", param=where)
    return "\n".join(p["text"] for p in parts)
