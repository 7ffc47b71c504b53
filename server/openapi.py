"""The OpenAPI document, as the server actually answers (FastAPI's generated one says otherwise).

FastAPI declares a 422 with its own validation body on every route with a body, and nothing else; this server
answers 400 with OpenAI's error envelope, plus 401/404/408/413/429/500/503, streams `text/event-stream`, and
serves Prometheus text at /metrics. `install_openapi(app, config)` replaces `app.openapi` with a document
that declares, per route: every status with its body schema, the SSE and Prometheus content types,
`X-Request-Id` on every response (and `Retry-After` on 429), the bearer scheme when an API key is set, and the
operator's caps (`--max-n`, `--max-logprobs`) as maxima of the request fields, and the served model id. The tests check the server
against this document with schemathesis (tests/server/test_openapi.py).
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from plm_serve.server.config import ServerConfig
from plm_serve.server.middleware import KEYED_ROUTES
from plm_serve.server.protocol import (
    ChatCompletionChunk,
    ChatCompletionResponse,
    CompletionResponse,
    ErrorResponse,
    ModelList,
)
from plm_serve.server.responses_protocol import ResponseObject

_REF = "#/components/schemas/{model}"
_REQUEST_ID = {
    "X-Request-Id": {
        "description": "The client's X-Request-Id if it is a sane token, else a fresh one",
        "required": True,
        "schema": {"type": "string"},
    }
}
_ERRORS = {
    "400": "Invalid request: bad JSON, a bad or out-of-range value, undecodable media, a prompt too long",
    "401": "Missing or wrong API key (only when the server has one)",
    "404": "Unknown model",
    "408": "The request body did not arrive in time",
    "413": "The body, or a media item, is over its limit",
    "429": "The engine's queue is full; retry after Retry-After seconds",
    "500": "A bug in the server (the connection is closed after it)",
    "503": "The engine is loading, stopped, or the server is shutting down",
}
# Which errors each route can answer (beyond the 200).
_ROUTE_ERRORS = {
    ("post", "/v1/chat/completions"): list(_ERRORS),
    ("post", "/v1/completions"): list(_ERRORS),
    ("post", "/v1/responses"): list(_ERRORS),
    ("get", "/v1/models"): ["401", "500"],
    ("get", "/v1/models/{model_id}"): ["401", "404", "500"],
}


class HealthStatus(BaseModel):
    status: str
    reason: str | None = None


class VersionInfo(BaseModel):
    version: str


def install_openapi(app: FastAPI, config: ServerConfig) -> None:
    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = build_document(app, config)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def build_document(app: FastAPI, config: ServerConfig) -> dict[str, Any]:
    doc = get_openapi(title=app.title, version=app.version, routes=app.routes)
    schemas = doc.setdefault("components", {}).setdefault("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):
        schemas.pop(name, None)
    models: list[type[BaseModel]] = [
        ErrorResponse,
        ChatCompletionResponse,
        ChatCompletionChunk,
        CompletionResponse,
        ResponseObject,
        ModelList,
        HealthStatus,
        VersionInfo,
    ]
    refs, defs = models_json_schema([(m, "serialization") for m in models], ref_template=_REF)
    schemas.update(defs.get("$defs", {}))
    ref = {m.__name__: refs[(m, "serialization")] for m in models}
    for path, operations in doc["paths"].items():
        for method, op in operations.items():
            op["responses"] = _responses(method, path, ref, op.get("responses", {}))
    _declare_caps(schemas, config)
    _add_examples(doc, config.model_name)
    if config.api_key:
        doc["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
        for path, operations in doc["paths"].items():
            if path.startswith("/v1"):
                for op in operations.values():
                    op["security"] = [{"bearer": []}]
    return doc


def _json(schema: dict[str, Any], description: str, **headers: Any) -> dict[str, Any]:
    return {
        "description": description,
        "headers": {**_REQUEST_ID, **headers},
        "content": {"application/json": {"schema": schema}},
    }


def _sse(chunk: dict[str, Any], error: dict[str, Any]) -> dict[str, Any]:
    """One server-sent event (each `data:` line): a chunk, an in-band error (the stream had started when it
    happened), or the final `[DONE]`."""
    payload = {"contentMediaType": "application/json", "contentSchema": {"anyOf": [chunk, error]}}
    data = {"anyOf": [{"const": "[DONE]"}, {"type": "string", **payload}]}
    return {"schema": {"type": "object", "properties": {"data": data}, "required": ["data"]}}


def _responses(
    method: str, path: str, ref: dict[str, dict[str, Any]], generated: dict[str, Any]
) -> dict[str, Any]:
    """The responses of one operation. Routes this module does not know keep FastAPI's success responses and
    get the standard errors of their kind (every /v1 POST can answer all of `_ERRORS`)."""
    ok: dict[str, Any]
    if path == "/v1/chat/completions":
        ok = _json(ref["ChatCompletionResponse"], "A completion, or an SSE stream of chunks with stream=true")
        ok["content"]["text/event-stream"] = _sse(ref["ChatCompletionChunk"], ref["ErrorResponse"])
    elif path == "/v1/completions":
        ok = _json(ref["CompletionResponse"], "A completion, or an SSE stream of chunks with stream=true")
        ok["content"]["text/event-stream"] = _sse(ref["CompletionResponse"], ref["ErrorResponse"])
    elif path == "/v1/responses":
        ok = _json(ref["ResponseObject"], "A response, or an SSE stream of response events with stream=true")
        event = {"type": "object", "properties": {"type": {"type": "string"}}, "required": ["type"]}
        ok["content"]["text/event-stream"] = _sse(event, ref["ErrorResponse"])
    elif path == "/v1/models":
        ok = _json(ref["ModelList"], "The served model")
    elif path == "/health":
        return {
            "200": _json(ref["HealthStatus"], "Ready to serve"),
            "503": _json(ref["HealthStatus"], "Loading, engine stopped, or draining (shutting down)"),
        }
    elif path == "/metrics":
        text = {"schema": {"type": "string"}}
        return {
            "200": {
                "description": "Prometheus metrics",
                "headers": _REQUEST_ID,
                "content": {"text/plain": text},
            }
        }
    elif path == "/version":
        ok = _json(ref["VersionInfo"], "The server's version")
    else:
        out = {
            code: {**r, "headers": {**_REQUEST_ID, **r.get("headers", {})}} for code, r in generated.items()
        }
        out.pop("422", None)
        api = path.startswith("/v1") or path in KEYED_ROUTES  # the model's routes: keyed, validated
        default_errors = list(_ERRORS) if method == "post" else ["401", "500"]
        for status in _ROUTE_ERRORS.get((method, path), default_errors if api else ["500"]):
            out[status] = _error(status, ref)
        return out
    out = {"200": ok}
    for status in _ROUTE_ERRORS.get((method, path), []):
        out[status] = _error(status, ref)
    return out


def _error(status: str, ref: dict[str, dict[str, Any]]) -> dict[str, Any]:
    extra = {"Retry-After": {"schema": {"type": "string"}, "required": True}} if status == "429" else {}
    return _json(ref["ErrorResponse"], _ERRORS[status], **extra)


def _add_examples(doc: dict[str, Any], model: str) -> None:
    """Request examples (documentation, and the requests schemathesis sends first in its examples phase)."""
    user = [{"role": "user", "content": "Hello!"}]
    examples = {
        "/v1/chat/completions": {
            "text": {"model": model, "messages": user, "max_tokens": 16},
            "stream": {
                "model": model,
                "messages": user,
                "max_tokens": 16,
                "stream": True,
                "stream_options": {"include_usage": True},
                "logprobs": True,
                "top_logprobs": 2,
            },
        },
        "/v1/completions": {
            "text": {"model": model, "prompt": "Once upon a time", "max_tokens": 16},
            "stream": {"model": model, "prompt": ["a", "b"], "max_tokens": 8, "stream": True, "n": 2},
            "token ids": {"model": model, "prompt": [128000, 791, 4062], "max_tokens": 8, "logprobs": 1},
        },
    }
    for path, named in examples.items():
        body = doc["paths"][path]["post"].get("requestBody", {}).get("content", {}).get("application/json")
        if body is not None:
            body["examples"] = {name: {"value": value} for name, value in named.items()}


def _declare_caps(schemas: dict[str, Any], config: ServerConfig) -> None:
    """The operator's caps as the fields' maxima, and the served model as `model`'s only value, so the
    document promises what the server accepts (another model id is a 404)."""
    for model in ("ChatCompletionRequest", "CompletionRequest"):
        prop = schemas.get(model, {}).get("properties", {}).get("model")
        for branch in (prop or {}).get("anyOf", []):
            if branch.get("type") == "string":
                branch["enum"] = [config.model_name]
    caps = {
        ("ChatCompletionRequest", "n"): config.max_n,
        ("CompletionRequest", "n"): config.max_n,
        ("CompletionRequest", "best_of"): config.max_n,
        ("ChatCompletionRequest", "top_logprobs"): config.max_logprobs,
        ("CompletionRequest", "logprobs"): config.max_logprobs,
    }
    for (model, field), limit in caps.items():
        prop = schemas.get(model, {}).get("properties", {}).get(field)
        for branch in (prop or {}).get("anyOf", [prop] if prop else []):
            if branch.get("type") == "integer":
                branch["maximum"] = min(branch.get("maximum", limit), limit)
