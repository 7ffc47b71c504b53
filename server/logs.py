"""Process logging: classic text lines, or one JSON object per line (`--log-format json`) for log collectors.

A JSON line carries the id of the HTTP request it was logged for: the `X-Request-Id` that the RequestId
middleware answers with (the client's, a router's, or a fresh one), so one request can be followed from the
router's log through the replica's. The id travels in a contextvar set by that middleware, which everything
running for the request sees without passing it around: route handlers, streaming generators, the exception
handlers and uvicorn's access line (uvicorn serves each request in its own asyncio task, so the value lives
and dies with the request). Records from the engine thread or from startup have no request and no such key.
"""

from __future__ import annotations

import contextvars
import json
import logging
from datetime import UTC, datetime
from typing import Any

import uvicorn.config

LOG_FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

current_request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "plm_serve_request_id", default=None
)

# uvicorn's access line is `'%s - "%s %s HTTP/%s" %d'` over these arguments: kept as fields, not just text.
_ACCESS_FIELDS = ("client", "method", "path", "http_version", "status")


class JsonFormatter(logging.Formatter):
    """`{"time", "level", "logger", "message"[, "request_id"][, access fields][, "exception"]}` on one line."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        request_id = current_request_id.get()
        if request_id is not None:
            entry["request_id"] = request_id
        if record.name == "uvicorn.access" and isinstance(record.args, tuple) and len(record.args) == 5:
            entry.update(zip(_ACCESS_FIELDS, record.args, strict=True))
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


def configure_logging(level: str, log_format: str) -> None:
    """The root handler (stderr) in the chosen format; call once, before anything logs."""
    if log_format not in LOG_FORMATS:
        raise ValueError(f"log format {log_format!r}: use one of {', '.join(LOG_FORMATS)}")
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT))
    logging.basicConfig(level=level.upper(), handlers=[handler])


def uvicorn_log_config(log_format: str) -> dict[str, Any]:
    """uvicorn's `log_config`: its own default for text; for JSON, its loggers hand their records to the root
    handler, so the access and error lines come out as JSON (with the request id) like every other record."""
    if log_format == "text":
        return uvicorn.config.LOGGING_CONFIG
    passthrough = {"handlers": [], "propagate": True}
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "loggers": {name: dict(passthrough) for name in ("uvicorn", "uvicorn.error", "uvicorn.access")},
    }
