"""`--log-format json`: one JSON object per line, carrying the id of the request it was logged for.

The live path (uvicorn's access line of a real `plm-serve --log-format json` behind the router) is checked in
tests/deploy/test_router.py; here the formatter, the middleware's contextvar and the CLI flag.
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest

from plm_serve.server import __main__ as cli
from plm_serve.server.logs import JsonFormatter, configure_logging, uvicorn_log_config
from tests.server.conftest import chat_body


@pytest.fixture
def json_lines() -> Iterator[io.StringIO]:
    """Records of the `plm_serve` loggers, formatted as JSON when emitted (in the request's context)."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("plm_serve")
    logger.addHandler(handler)
    try:
        yield stream
    finally:
        logger.removeHandler(handler)


def parsed(stream: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_a_record_outside_any_request_has_no_request_id():
    record = logging.LogRecord("plm_serve.engine", logging.INFO, __file__, 1, "loaded %s", ("x",), None)
    entry = json.loads(JsonFormatter().format(record))
    assert (
        entry["message"] == "loaded x" and entry["level"] == "INFO" and entry["logger"] == "plm_serve.engine"
    )
    assert "request_id" not in entry
    assert entry["time"].endswith("+00:00")  # ISO 8601, UTC


def test_uvicorn_access_lines_keep_their_fields():
    args = ("127.0.0.1:5000", "POST", "/v1/chat/completions", "1.1", 200)
    record = logging.LogRecord(
        "uvicorn.access", logging.INFO, __file__, 1, '%s - "%s %s HTTP/%s" %d', args, None
    )
    entry = json.loads(JsonFormatter().format(record))
    assert entry["message"] == '127.0.0.1:5000 - "POST /v1/chat/completions HTTP/1.1" 200'
    assert (entry["method"], entry["path"], entry["status"]) == ("POST", "/v1/chat/completions", 200)


def test_a_warning_during_a_request_carries_the_id_the_response_carries(client, json_lines):
    """The client's id when it is a sane token, else a fresh one: the logged id is the answered one."""
    body = chat_body("Hi", max_tokens=2, some_future_field=1)  # an ignored field logs a warning
    given = client.post("/v1/chat/completions", json=body, headers={"X-Request-Id": "trace-7"})
    fresh = client.post("/v1/chat/completions", json=body)
    refused = client.post("/v1/chat/completions", json=body, headers={"X-Request-Id": "bad id!"})
    assert all(r.status_code == 200 for r in (given, fresh, refused))
    answered = [r.headers["x-request-id"] for r in (given, fresh, refused)]
    logged = [e["request_id"] for e in parsed(json_lines) if "some_future_field" in e["message"]]
    assert logged == answered
    assert answered[0] == "trace-7" and len(set(answered)) == 3 and "bad id!" not in answered


def test_an_unexpected_error_is_logged_with_the_request_id_and_traceback(make_client, processor, json_lines):
    """The 500 handler runs outside the middleware stack, after RequestId returned: the id is still logged,
    so a user's report of the id they sent finds the traceback."""

    class Broken:
        tokenizer = processor.tokenizer

        def process_chat(self, *args, **kwargs):
            raise RuntimeError("bug in processing")

    client = make_client(proc=Broken())
    resp = client.post("/v1/chat/completions", json=chat_body("Hi"), headers={"X-Request-Id": "trace-42"})
    assert resp.status_code == 500
    client.expected_internal_errors = 1  # this one; the fixture checks there is no other
    (entry,) = [e for e in parsed(json_lines) if e["level"] == "ERROR"]
    assert entry["request_id"] == "trace-42"
    assert "RuntimeError: bug in processing" in entry["exception"]


def test_the_cli_flag_and_the_uvicorn_config():
    assert cli.build_parser().parse_args([]).log_format == "text"
    assert cli.build_parser().parse_args(["--log-format", "json"]).log_format == "json"
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["--log-format", "xml"])
    with pytest.raises(ValueError, match="log format"):
        configure_logging("info", "xml")
    # JSON: uvicorn's loggers own no handler and propagate to the root's JSON handler.
    loggers = uvicorn_log_config("json")["loggers"]
    assert set(loggers) == {"uvicorn", "uvicorn.error", "uvicorn.access"}
    assert all(cfg == {"handlers": [], "propagate": True} for cfg in loggers.values())
    assert "formatters" in uvicorn_log_config("text")  # uvicorn's own default, unchanged
