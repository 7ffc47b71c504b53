"""Pure ASGI middleware, outermost first: tag responses with a request id, count requests by status, turn any
unexpected exception into the project's own 500, check the API key, read the body (bounded in size and time).
(Strict JSON is the routes' own reader: strict_json.py.)

They run before FastAPI parses anything, so an unauthenticated or oversized request never reaches JSON parsing
or validation (a 401 is not hidden behind a 400, and a 1 GB body is never buffered).
"""

from __future__ import annotations

import hmac
import logging
import re
import uuid

import anyio
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from plm_serve.server.errors import APIError, internal_error
from plm_serve.server.logs import current_request_id
from plm_serve.server.metrics import ServerMetrics

logger = logging.getLogger(__name__)

COUNTED_ROUTES = frozenset(
    {"/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics", "/version"}
    | {"/v1/responses", "/tokenize", "/detokenize"}
)
# Routes outside /v1 that serve the model and so need the API key like /v1 does (vLLM's paths).
KEYED_ROUTES = frozenset({"/tokenize", "/detokenize"})


async def _send_error(send: Send, err: APIError) -> None:
    response = err.response()
    await send(
        {"type": "http.response.start", "status": response.status_code, "headers": response.raw_headers}
    )
    await send({"type": "http.response.body", "body": response.body})


_CLIENT_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


class RequestId:
    """Every response carries `X-Request-Id`: the client's own (if it is a sane token) or a fresh one, so a
    request can be followed through logs and proxies. Errors answered by inner middleware carry it too."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        given = dict(scope["headers"]).get(b"x-request-id", b"").decode("latin-1")
        request_id = given if _CLIENT_REQUEST_ID.fullmatch(given) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        # Not reset on the way out: the request's task ends with it, and the outermost error handler (which
        # logs unexpected errors after this middleware has returned) still sees the id.
        current_request_id.set(request_id)

        async def tagging_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"x-request-id"]
                message = {**message, "headers": [*headers, (b"x-request-id", request_id.encode())]}
            await send(message)

        await self.app(scope, receive, tagging_send)


class RequestCounter:
    """`plm_http_requests_total{route, status}`; unknown paths share one label, so scanners cannot blow it
    up."""

    def __init__(self, app: ASGIApp, metrics: ServerMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = 499  # nginx's "client closed request", if no response is ever started

        async def counting_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, counting_send)
        except Exception:
            if status == 499:
                status = 500  # the outermost error middleware answers it
            raise
        finally:
            route = scope["path"] if scope["path"] in COUNTED_ROUTES else "other"
            self.metrics.http_requests.labels(route, str(status)).inc()


class InternalErrorGuard:
    """The project's own 500: any exception that escapes the app becomes OpenAI's error body, with
    `X-Request-Id` (this runs inside RequestId) and `Connection: close` (the connection's state is unknown, so
    a pooled client must not reuse it), and is counted as `plm_internal_errors_total{cause="server"}`.

    Starlette's own last-resort handler sits outside every middleware: its 500 has no request id and it
    re-raises, so uvicorn drops the kept-alive connection without saying so. If the response had already
    started (a stream), nothing can be sent any more: the exception is counted and re-raised, and uvicorn
    closes the connection.
    """

    def __init__(self, app: ASGIApp, metrics: ServerMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception:
            logger.exception("unexpected error in %s %s", scope.get("method"), scope.get("path"))
            self.metrics.internal_errors.labels("server").inc()
            if started:
                raise
            await _send_error(send, internal_error())


class ApiKeyAuth:
    """With an API key configured, every /v1 route needs `Authorization: Bearer <key>` (OpenAI clients send
    it)."""

    def __init__(self, app: ASGIApp, api_key: str | None) -> None:
        self.app = app
        self.expected = f"Bearer {api_key}".encode() if api_key else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            self.expected is not None
            and scope["type"] == "http"
            and (scope["path"].startswith("/v1") or scope["path"] in KEYED_ROUTES)
        ):
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):  # constant time: no key-guessing by timing
                err = APIError(
                    401,
                    "Missing or incorrect API key: send it as 'Authorization: Bearer <key>'",
                    code="invalid_api_key",
                    headers={"WWW-Authenticate": "Bearer"},
                )
                return await _send_error(send, err)
        await self.app(scope, receive, send)


# Routes whose bodies carry media (base64 data URLs): they get `max_request_body_bytes`; every other route is
# text and gets `max_text_request_body_bytes`.
# Routes whose bodies may carry media (data: URLs): the larger body limit applies.
MEDIA_ROUTES = frozenset({"/v1/chat/completions", "/v1/responses", "/tokenize"})


class RequestBody:
    """Reads the body once, bounded, and replays it to the app.

    * size: 413 when Content-Length, or the body actually streamed, exceeds the route's limit (media routes
      and text routes have their own, see MEDIA_ROUTES);
    * time: 408 when the whole body has not arrived within `read_timeout_s` (a slow upload holds a
      connection and a buffer for as long as the client likes otherwise).
    After the replay, `receive` passes through, so the app still sees `http.disconnect`.
    """

    def __init__(
        self, app: ASGIApp, max_media_bytes: int, max_text_bytes: int, read_timeout_s: float
    ) -> None:
        self.app = app
        self.max_media_bytes = max_media_bytes
        self.max_text_bytes = max_text_bytes
        self.read_timeout_s = read_timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self.max_media_bytes if scope["path"] in MEDIA_ROUTES else self.max_text_bytes
        headers = dict(scope["headers"])
        declared = headers.get(b"content-length", b"")
        if declared.isdigit() and int(declared) > limit:
            return await _send_error(send, _too_large(limit, scope["path"]))
        chunks: list[bytes] = []
        total = 0
        with anyio.move_on_after(self.read_timeout_s) as deadline:
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return  # the client gave up while uploading: nothing to answer
                chunk = message.get("body", b"")
                total += len(chunk)
                if total > limit:
                    return await _send_error(send, _too_large(limit, scope["path"]))
                chunks.append(chunk)
                if not message.get("more_body", False):
                    break
        if deadline.cancelled_caught:
            return await _send_error(send, _read_timeout(self.read_timeout_s))
        replay: list[Message] = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]

        async def replaying_receive() -> Message:
            return replay.pop() if replay else await receive()

        await self.app(scope, replaying_receive, send)


def _too_large(limit: int, path: str) -> APIError:
    flag = "--max-request-body-bytes" if path in MEDIA_ROUTES else "--max-text-request-body-bytes"
    return APIError(
        413,
        f"The request body is larger than the limit of {limit} bytes for {path} ({flag})",
        code="request_too_large",
    )


def _read_timeout(seconds: float) -> APIError:
    return APIError(
        408,
        f"The request body did not arrive within {seconds:g} s (--request-read-timeout-s)",
        code="request_timeout",
        headers={"Connection": "close"},
    )
