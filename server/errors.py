"""Every failure becomes OpenAI's error envelope: `{"error": {"message", "type", "param", "code"}}`.

Status mapping (the one place it is decided):

| cause | status | type / code |
|---|---|---|
| bad parameter or JSON, validation, undecodable media, prompt too long | 400 | invalid_request_error |
| missing or wrong API key | 401 | invalid_request_error / invalid_api_key |
| unknown model | 404 | invalid_request_error / model_not_found |
| the body did not arrive within `request_read_timeout_s` | 408 | invalid_request_error / request_timeout |
| body over its route's limit; media over a size or count limit | 413 | invalid_request_error |
| engine queue full (`EngineOverloadedError`) | 429, `Retry-After: 1` | rate_limit_error / engine_overloaded |
| engine loading, dead or shutting down (`EngineDeadError`) | 503 | server_error / engine_unavailable |
| anything else (a bug) | 500, `Connection: close` | server_error / internal_error |

The 500 is answered by `middleware.InternalErrorGuard` (inside the request-id and counting middleware, so it
has `X-Request-Id` and is counted); no exception handler here catches `Exception`.

Why 429 for a full queue: the request was fine and the server is healthy, it is only busy. 429 with
Retry-After is what OpenAI clients already back off and retry on (the official client honours Retry-After),
while 503 stays reserved for "this server cannot serve at all", which is what load balancers act on.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from plm_serve.engine import EngineDeadError, EngineOverloadedError, RequestRejectedError
from plm_serve.processors import MediaTooLargeError, ProcessorError

logger = logging.getLogger(__name__)

RETRY_AFTER_SECONDS = 1


class APIError(Exception):
    """An error with its HTTP status, raised anywhere in a request and rendered by `api_error_handler`."""

    def __init__(
        self,
        status_code: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status_code, headers=self.headers)


class ClientDisconnected(Exception):
    """The client went away before the response was ready. Answered with 499 (nginx's "client closed
    request"), which nobody reads but the request counter records."""


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def internal_error() -> APIError:
    """A bug: no internals in the message, and the connection is closed after it (its state is unknown)."""
    return APIError(
        500,
        "internal server error",
        type="server_error",
        code="internal_error",
        headers={"Connection": "close"},
    )


def service_unavailable(message: str) -> APIError:
    return APIError(503, message, type="server_error", code="engine_unavailable")


def from_exception(exc: BaseException) -> APIError:
    """Map an engine or processor exception (or an APIError) to its APIError; anything else is a 500."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, EngineOverloadedError):
        return APIError(
            429,
            str(exc),
            type="rate_limit_error",
            code="engine_overloaded",
            headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
        )
    if isinstance(exc, EngineDeadError):
        return service_unavailable(str(exc))
    if isinstance(exc, RequestRejectedError):
        return bad_request(str(exc), code="request_rejected")
    if isinstance(exc, MediaTooLargeError):
        return APIError(413, str(exc), param=exc.param, code="media_too_large")
    if isinstance(exc, ProcessorError):
        return bad_request(str(exc), param=exc.param, code=_code_of(exc))
    return internal_error()


def _code_of(exc: ProcessorError) -> str:
    # MediaDecodeError -> "media_decode_error", PromptTooLongError -> "prompt_too_long_error", ...
    name = type(exc).__name__
    return "".join("_" + c.lower() if c.isupper() else c for c in name).lstrip("_")


_TYPE_LABELS = {"str", "int", "float", "bool", "dict", "list", "none"}


def param_from_loc(loc: tuple[Any, ...]) -> str | None:
    """("body", "messages", 0, "content") -> "messages[0].content" (OpenAI's `param` spelling).

    Pydantic puts union members into `loc` ("str", "list[tagged-union[...]]", then the discriminator's tag);
    they are not paths in the request, so they are dropped.
    """
    out, after_tagged_union = "", False
    for i, p in enumerate(loc):
        if isinstance(p, int):
            out += f"[{p}]"
            continue
        if p in ("body", "query", "path", "header") and i == 0:
            continue
        if "[" in p or p in _TYPE_LABELS or p.startswith(("function-", "constrained-")):
            after_tagged_union = "tagged-union" in p
            continue
        if after_tagged_union and isinstance(loc[i - 1], int):
            after_tagged_union = False
            continue  # the tag value ("image_url") that picked the union member
        out += f".{p}" if out else p
    return out or None


def validation_error(exc: RequestValidationError) -> APIError:
    """FastAPI's 422 becomes OpenAI's 400; `param` points at the most specific offending field."""
    errors = exc.errors()
    if not errors:
        return bad_request("invalid request")
    # For a union (content: str | list[part]) pydantic reports every alternative; the deepest error is the one
    # about what the client actually sent.
    first = max(errors, key=lambda e: len(e.get("loc", ())))
    if first.get("type") == "json_invalid":
        detail = (first.get("ctx") or {}).get("error", "JSON decode error")
        return bad_request(f"The request body is not valid JSON: {detail}", code="invalid_json")
    param = param_from_loc(tuple(first.get("loc", ())))
    message = str(first.get("msg", "invalid value"))
    if first.get("type") == "missing" and param is None:
        message = "The request body is empty: send a JSON object (Content-Type: application/json)"
    elif first.get("type") == "model_attributes_type" and param is None:
        message = "The request body must be a JSON object (send Content-Type: application/json)"
    elif param:
        message = f"Invalid value for '{param}': {message}"
    return bad_request(message, param=param)


def install_exception_handlers(app: FastAPI) -> None:
    async def on_api_error(request: Request, exc: Exception) -> JSONResponse:
        return from_exception(exc).response()

    async def on_validation(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        strict = getattr(exc.__cause__, "api_error", None)  # the strict JSON reader said what is wrong
        if isinstance(strict, APIError):
            return strict.response()
        return validation_error(exc).response()

    async def on_http(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        headers = dict(exc.headers) if exc.headers else None
        err = APIError(exc.status_code, str(exc.detail), code=code, headers=headers)
        return err.response()

    async def on_disconnect(request: Request, exc: Exception) -> Response:
        return Response(status_code=499)

    for exc_type in (APIError, EngineOverloadedError, EngineDeadError, RequestRejectedError, ProcessorError):
        app.add_exception_handler(exc_type, on_api_error)
    app.add_exception_handler(ClientDisconnected, on_disconnect)
    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(StarletteHTTPException, on_http)
