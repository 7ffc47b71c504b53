"""A request's output constraint as the engine's `StructuredOutputParams`, from whichever spelling it used.

Accepted (at most one per request, else 400):
  * OpenAI `response_format`: {"type": "json_object"} or {"type": "json_schema", "json_schema": {"schema": ...}}
    ("text" means no constraint; `strict` changes nothing: the output always follows the schema as written);
  * vLLM's `structured_outputs`: {"json": schema} | {"regex": ...} | {"choice": [...]} | {"grammar": ...} |
    {"json_object": true};
  * vLLM's older `guided_json`, `guided_regex`, `guided_choice`, `guided_grammar`.
The Responses API's `text.format` maps onto the same `response_format` shape (responses.py).
"""

from __future__ import annotations

import json
from typing import Any

from plm_serve.engine import StructuredOutputParams
from plm_serve.server.errors import bad_request
from plm_serve.server.protocol_tools import ResponseFormat, StructuredOutputsOptions


def structured_output_of(body: Any) -> tuple[StructuredOutputParams, str] | None:
    """(params, the request field they came from) or None. `body` is a chat or completion request."""
    found: list[tuple[StructuredOutputParams, str]] = []
    response_format: ResponseFormat | None = getattr(body, "response_format", None)
    if response_format is not None and response_format.type != "text":
        where = (
            "response_format.json_schema.schema"
            if response_format.type == "json_schema"
            else "response_format"
        )
        found.append((from_response_format(response_format, "response_format"), where))
    options: StructuredOutputsOptions | None = getattr(body, "structured_outputs", None)
    if options is not None:
        found.append((_from_options(options), "structured_outputs"))
    for name, kind in (
        ("guided_json", "json_schema"),
        ("guided_regex", "regex"),
        ("guided_choice", "choice"),
        ("guided_grammar", "grammar"),
    ):
        value = getattr(body, name, None)
        if value is not None:
            found.append((_params(kind, value, name), name))
    if len(found) > 1:
        fields = ", ".join(f for _, f in found)
        raise bad_request(
            f"give one output constraint, not several ({fields})", param=found[1][1].split(".")[0]
        )
    return found[0] if found else None


def from_response_format(fmt: ResponseFormat, param: str) -> StructuredOutputParams:
    if fmt.type == "json_object":
        return StructuredOutputParams("json_object")
    if fmt.json_schema is None or fmt.json_schema.json_schema is None:
        raise bad_request(
            "a json_schema response format needs json_schema.schema", param=f"{param}.json_schema"
        )
    return _params("json_schema", fmt.json_schema.json_schema, f"{param}.json_schema.schema")


def _from_options(options: StructuredOutputsOptions) -> StructuredOutputParams:
    given = [
        (kind, value, name)
        for kind, value, name in (
            ("json_schema", options.json_, "json"),
            ("regex", options.regex, "regex"),
            ("choice", options.choice, "choice"),
            ("grammar", options.grammar, "grammar"),
            ("json_object", options.json_object or None, "json_object"),
        )
        if value is not None
    ]
    if len(given) != 1:
        raise bad_request(
            "structured_outputs takes exactly one of json, regex, choice, grammar, json_object",
            param="structured_outputs",
        )
    kind, value, name = given[0]
    if kind == "json_object":
        return StructuredOutputParams("json_object")
    return _params(kind, value, f"structured_outputs.{name}")


def _params(kind: str, value: Any, param: str) -> StructuredOutputParams:
    """Validate the shape (the grammar itself is compiled by the engine) and serialize it."""
    if kind == "json_schema":
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except ValueError as exc:
                raise bad_request(f"the JSON schema is not valid JSON: {exc}", param=param) from None
        if not isinstance(value, dict | bool):
            raise bad_request("a JSON schema must be an object", param=param)
        return StructuredOutputParams(kind, json.dumps(value))
    if kind == "choice":
        if not value or not all(isinstance(c, str) and c for c in value):
            raise bad_request("choice must be a non-empty list of non-empty strings", param=param)
        return StructuredOutputParams(kind, json.dumps(value))
    if not isinstance(value, str) or not value:
        raise bad_request(f"{param} must be a non-empty string", param=param)
    return StructuredOutputParams(kind, value)
