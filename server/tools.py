"""Function tools: what the prompt shows, what the grammar enforces, how the output is read back.

`plan_tools(functions, tool_choice, parallel_tool_calls)` (shared by chat and the Responses API):
  * "none" (the default without tools): tools are not shown to the model and nothing is parsed;
  * "auto" (the default with tools): tools are shown (processors/tool_prompt.py); the output is parsed for calls
    (tool_parser.py); finish_reason "tool_calls" when it made any;
  * "required" / a named function: additionally, the grammar only lets the model write calls,
    `call ("; " call)*` (one call when parallel_tool_calls is false), each `{"name": <a function>, "parameters":
    <that function's parameters schema>}`, so the arguments always validate. Finish reason "tool_calls" for
    required, "stop" for a named function (as OpenAI reports a forced call).
A `response_format` JSON schema together with "auto" tools becomes one grammar: the answer in that schema, or
calls. Other output constraints cannot be combined with tools (400).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from plm_serve.engine import StructuredOutputParams
from plm_serve.engine.structured_output import lark_json
from plm_serve.processors.tool_prompt import CALL_SEPARATOR
from plm_serve.server.errors import bad_request
from plm_serve.server.protocol_tools import ChatTool, NamedToolChoice, ToolChoice
from plm_serve.server.tool_parser import ToolCallParser

NO_PARAMETERS = {"type": "object", "properties": {}, "additionalProperties": False}


@dataclass(frozen=True)
class Function:
    name: str
    description: str | None = None
    parameters: dict[str, Any] = field(default_factory=lambda: dict(NO_PARAMETERS))

    def as_tool(self) -> dict[str, Any]:
        """OpenAI's chat tool shape, which is what the prompt shows (and templates expect)."""
        function: dict[str, Any] = {"name": self.name}
        if self.description:
            function["description"] = self.description
        function["parameters"] = self.parameters
        return {"type": "function", "function": function}


@dataclass(frozen=True)
class ToolPlan:
    functions: list[Function]
    mode: str  # none | auto | required | named
    parallel: bool = True
    named: str | None = None

    @property
    def prompt_tools(self) -> list[dict[str, Any]] | None:
        if self.mode == "none" or not self.functions:
            return None
        return [f.as_tool() for f in self.functions if self.named is None or f.name == self.named]

    @property
    def parses(self) -> bool:
        return self.mode != "none"

    def parser(self) -> ToolCallParser | None:
        """A fresh parser for one choice (None when the output is plain content)."""
        if not self.parses:
            return None
        return ToolCallParser({f.name for f in self.functions}, forced=self.mode in ("required", "named"))

    def finish_reason(self, reason: str, called: bool) -> str:
        if called and reason == "stop" and self.mode != "named":
            return "tool_calls"
        return reason

    def grammar(self, answer: StructuredOutputParams | None, param: str) -> StructuredOutputParams | None:
        """The output constraint: forced calls, the answer-or-calls union, or just `answer`."""
        if self.mode in ("none",) or (self.mode == "auto" and answer is None):
            return answer
        if self.mode in ("required", "named") and answer is not None:
            raise bad_request(
                f"tool_choice {self.mode} cannot be combined with an output constraint", param=param
            )
        functions = [f for f in self.functions if self.named is None or f.name == self.named]
        call = lark_json({"anyOf": [_call_schema(f) for f in functions]})
        calls = f"call ({json.dumps(CALL_SEPARATOR)} call)*" if self.parallel else "call"
        if self.mode != "auto":
            return StructuredOutputParams("grammar", f"start: {calls}\ncall: {call}\n")
        if answer is None or answer.kind not in ("json_schema", "json_object"):
            raise bad_request("with tools, only a JSON response_format can constrain the answer", param=param)
        schema = json.loads(answer.spec) if answer.kind == "json_schema" else {"type": "object"}
        return StructuredOutputParams(
            "grammar", f"start: answer | {calls}\nanswer: {lark_json(schema)}\ncall: {call}\n"
        )


def _call_schema(function: Function) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": {"name": {"const": function.name}, "parameters": function.parameters},
        "required": ["name", "parameters"],
        "additionalProperties": False,
    }


def plan_tools(
    functions: list[Function], tool_choice: str | None, named: str | None, parallel: bool | None, param: str
) -> ToolPlan:
    """Validate and plan. `tool_choice` is none/auto/required/named (None: the default), `named` the function
    of a named choice; `param` is where tool_choice sits in the request, for errors."""
    names = [f.name for f in functions]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise bad_request(f"tool names must be unique; repeated: {', '.join(duplicates)}", param="tools")
    for f in functions:
        if f.parameters.get("type", "object") != "object":
            raise bad_request(
                f"the parameters of {f.name!r} must be a JSON schema of type object", param="tools"
            )
    mode = tool_choice or ("auto" if functions else "none")
    if mode in ("required", "named") and not functions:
        raise bad_request(f"tool_choice {mode!r} needs tools", param=param)
    if mode == "named" and named not in names:
        raise bad_request(f"tool_choice names {named!r}, which is not among the tools", param=param)
    return ToolPlan(
        functions, mode, parallel if parallel is not None else True, named if mode == "named" else None
    )


def chat_tool_plan(
    tools: list[ChatTool] | None, tool_choice: ToolChoice | None, parallel: bool | None
) -> ToolPlan:
    """The plan of a chat request's `tools`, `tool_choice` and `parallel_tool_calls`."""
    functions = [
        Function(t.function.name, t.function.description, t.function.parameters or dict(NO_PARAMETERS))
        for t in tools or []
    ]
    if isinstance(tool_choice, NamedToolChoice):
        return plan_tools(functions, "named", tool_choice.function.name, parallel, "tool_choice")
    return plan_tools(functions, tool_choice, None, parallel, "tool_choice")
