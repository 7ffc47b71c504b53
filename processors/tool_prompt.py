"""Tools in the prompt for chat templates that know none (PerceptionLM's): the Llama 3.1 JSON tool-call convention.

PerceptionLM's decoder starts from Llama 3 instruct weights, and Llama 3.1 / 3.2 were trained to call tools in
this form (Meta's "JSON based tool calling", the one transformers' Llama 3.1 template renders by default):

  * the tool definitions go at the start of the first user message, after Meta's instruction:
        Given the following functions, please respond with a JSON for a function call with its proper arguments
        that best answers the given prompt.

        Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.Do
        not use variables.

        {each tool, OpenAI's {"type": "function", "function": {...}}, as JSON indented by 4, then a blank line}
    (the missing space before "Do" is Meta's wording, kept verbatim);
  * the model answers with `{"name": "...", "parameters": {...}}`; several calls are separated by "; " (what
    vLLM's llama3_json parser reads);
  * an assistant turn with `tool_calls` is rendered as that text;
  * a `tool` result becomes an `ipython` turn (Llama 3.1's role for tool output) holding the result text.

`render_tool_messages` applies these rewrites to plain template data; the chat template then renders the
messages as usual, so a conversation without tools renders exactly as before.
"""

from __future__ import annotations

import json
from typing import Any

from plm_serve.processors.errors import InvalidContentError

TOOL_INSTRUCTION = (
    "Given the following functions, please respond with a JSON for a function call with its proper arguments "
    "that best answers the given prompt.\n\n"
    'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.'
    "Do not use variables.\n\n"
)
CALL_SEPARATOR = "; "
TOOL_RESULT_ROLE = "ipython"


def format_tool_call(name: str, arguments: Any) -> str:
    """One call as the model writes it: `{"name": "f", "parameters": {...}}`."""
    return json.dumps({"name": name, "parameters": arguments}, ensure_ascii=False)


def tools_text(tools: list[dict[str, Any]]) -> str:
    """The instruction and the tool definitions that open the first user message."""
    return TOOL_INSTRUCTION + "".join(json.dumps(t, indent=4, ensure_ascii=False) + "\n\n" for t in tools)


def render_tool_messages(
    messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None
) -> list[dict[str, Any]]:
    """Template data (see messages.py) with tools, tool calls and tool results written in as text."""
    out = []
    tools_pending = bool(tools)
    for message in messages:
        role, content = message["role"], message["content"]
        if role == "user" and tools_pending:
            content = _prepend_text(content, tools_text(tools or []))
            tools_pending = False
        elif role == "assistant" and message.get("tool_calls"):
            calls = CALL_SEPARATOR.join(
                format_tool_call(c["function"]["name"], c["function"]["arguments"])
                for c in message["tool_calls"]
            )
            content = _append_text(content, calls)
        elif role == "tool":
            role = TOOL_RESULT_ROLE
        out.append({"role": role, "content": content})
    if tools_pending:
        raise InvalidContentError("tools need a user message to be rendered into", param="messages")
    return out


def _prepend_text(parts: list[dict[str, Any]], text: str) -> list[dict[str, Any]]:
    """`text` in front of the message's first text part (templates trim and join text parts without a separator,
    so the tools must share a part with the user's words); media parts keep their place."""
    parts = list(parts)
    for i, part in enumerate(parts):
        if part["type"] == "text":
            parts[i] = {"type": "text", "text": text + part["text"]}
            return parts
    return [*parts, {"type": "text", "text": text}]


def _append_text(parts: list[dict[str, Any]], text: str) -> list[dict[str, Any]]:
    texts = [p["text"] for p in parts if p["type"] == "text" and p["text"].strip()]
    others = [p for p in parts if p["type"] != "text"]
    return [*others, {"type": "text", "text": "\n".join([*texts, text])}]
