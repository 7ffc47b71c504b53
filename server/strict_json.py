"""The one JSON reader for request bodies: strict where Python's `json` is lax.

`json.loads` accepts what no JSON client means and what later breaks: `NaN`/`Infinity` literals, numbers that
overflow to infinity (`1e999`), strings with lone surrogates (`"\\ud800"`, unencodable as UTF-8, so they fail
wherever text meets a C or Rust library, an error message, a log line), and bytes that are not UTF-8
(decoded with 'surrogatepass'). `check_json_body` refuses all of them with a 400 that points at the value
(`param`), before any route sees the body: the rule holds for every field, present and future, typed or
`Any`, ignored or not.

It is the route class of every API route (`StrictJSONRoute`): FastAPI's `await request.json()` parses with it,
so a body is parsed once.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi.routing import APIRoute
from starlette.requests import Request
from starlette.responses import Response

from plm_serve.server.errors import APIError, bad_request

_SURROGATE = re.compile("[\ud800-\udfff]")


class StrictJSONError(json.JSONDecodeError):
    """What `StrictJSONRequest.json` raises: FastAPI turns a JSONDecodeError into its validation error (with this
    as `__cause__`), and the validation handler answers with `api_error`, which says what and where."""

    def __init__(self, api_error: APIError) -> None:
        super().__init__(api_error.message, "", 0)
        self.api_error = api_error


class StrictJSONRequest(Request):
    async def json(self) -> Any:
        if not hasattr(self, "_strict_json"):
            try:
                self._strict_json = parse_json_body(await self.body())
            except APIError as err:
                raise StrictJSONError(err) from None
        return self._strict_json


class StrictJSONRoute(APIRoute):
    """An APIRoute whose handler reads JSON bodies with `parse_json_body`."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def strict_handler(request: Request) -> Response:
            return await handler(StrictJSONRequest(request.scope, request.receive))

        return strict_handler


def parse_json_body(body: bytes) -> Any:
    """The value of `body`, or a 400 APIError unless it is strict JSON (see the module docstring)."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise bad_request(
            f"The request body is not valid UTF-8 (byte {exc.start}: {body[exc.start : exc.start + 4]!r})",
            code="invalid_json",
        ) from None
    try:
        value = json.loads(text, parse_constant=_refuse_constant, parse_float=_finite_float)
    except json.JSONDecodeError as exc:
        raise bad_request(
            f"The request body is not valid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})",
            code="invalid_json",
        ) from None
    except RecursionError:
        raise bad_request("The request body is nested too deeply", code="invalid_json") from None
    except _NotFinite as exc:
        raise bad_request(
            f"The request body has a number JSON cannot carry: {exc}", code="invalid_json"
        ) from None
    except ValueError as exc:  # int(): more digits than Python converts (a number no field can take)
        raise bad_request(f"The request body has an unusable number: {exc}", code="invalid_json") from None
    where = _find_lone_surrogate(value)
    if where is not None:
        raise APIError(
            400,
            "The request has a string with a lone surrogate (invalid Unicode; it cannot be encoded as UTF-8)"
            + (f" at '{where}'" if where else ""),
            param=where or None,
            code="invalid_unicode",
        )
    return value


class _NotFinite(ValueError):
    pass


def _refuse_constant(name: str) -> float:
    raise _NotFinite(f"{name} (not a JSON number)")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _NotFinite(f"{text[:40]} (overflows a 64-bit float)")
    return value


def _find_lone_surrogate(value: Any) -> str | None:
    """The `param` path ("messages[0].content") of the first string or key holding a lone surrogate, or None.

    Iterative (any depth) and O(total characters): ASCII strings, the common case, are skipped in C, and a
    path is spelled out only for the value that is reported."""
    stack: list[tuple[Any, tuple[str | int, ...]]] = [(value, ())]
    while stack:
        item, path = stack.pop()
        if isinstance(item, str):
            if not item.isascii() and _SURROGATE.search(item):
                return _spell(path)
        elif isinstance(item, dict):
            for key, child in item.items():
                if not key.isascii() and _SURROGATE.search(key):
                    return _spell(path)  # the object holding the key: the key itself cannot be echoed
                if isinstance(child, str | dict | list):
                    stack.append((child, (*path, key)))
        elif isinstance(item, list):
            stack.extend((c, (*path, i)) for i, c in enumerate(item) if isinstance(c, str | dict | list))
    return None


def _spell(path: tuple[str | int, ...]) -> str:
    out = ""
    for p in path:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else p)
    return out
