"""One streamed chat request against a target server, timed: when each content chunk arrived, how many tokens.

A `Target` owns one httpx client bound to the target's base URL; requests only ever go to `<url>/v1/...` paths
of that URL (no redirects followed, no proxy taken from the environment), and media travel inside the bodies.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import httpx

from bench.serving.flavors import FLAVORS, request_body
from bench.serving.workload import RequestSpec


@dataclass
class RequestResult:
    """Timings in seconds from the moment the request was sent."""

    expected_tokens: int
    error: str | None = None  # the kind: "HTTP 500", "timeout", "connection error", "stream error", ...
    error_message: str = ""
    ttft: float | None = None  # first chunk with text
    e2e: float | None = None  # last byte of the stream
    chunk_times: list[float] = field(default_factory=list)  # arrival of every chunk with text
    output_tokens: int = 0  # the server's usage count, else the number of text chunks
    prompt_tokens: int | None = None
    tokens_from_usage: bool = False

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass
class Target:
    """A server under test: a base URL (`http://host:port`, no path), its flavor, and the model id to send."""

    name: str
    url: str
    flavor: str = "vllm"
    model: str | None = None
    api_key: str | None = None
    request_timeout_s: float = 600.0
    # CPU seconds the server process has used, where the benchmark started it (None for a remote URL)
    cpu_clock: Callable[[], float] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        parts = urlsplit(self.url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(f"target {self.name}: {self.url!r} is not an http(s)://host:port URL")
        self.url = self.url.rstrip("/").removesuffix("/v1")
        if self.flavor not in FLAVORS:
            raise ValueError(
                f"target {self.name}: unknown flavor {self.flavor!r} (known: {', '.join(FLAVORS)})"
            )

    def http_client(self, transport: httpx.AsyncBaseTransport | None = None) -> httpx.AsyncClient:
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        return httpx.AsyncClient(
            base_url=self.url,
            headers=headers,
            timeout=httpx.Timeout(self.request_timeout_s, connect=30.0),
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=None),
            follow_redirects=False,
            trust_env=False,
            transport=transport,
        )

    async def resolve_model(self, http: httpx.AsyncClient) -> str:
        """The model id to send: the one given, else the first of GET /v1/models."""
        if self.model is None:
            resp = await http.get("/v1/models")
            resp.raise_for_status()
            self.model = resp.json()["data"][0]["id"]
        return self.model


async def send(http: httpx.AsyncClient, target: Target, spec: RequestSpec) -> RequestResult:
    """Send `spec` as a streamed chat completion and time it; never raises for a failed request."""
    assert target.model is not None, "resolve_model() first"
    body = request_body(target.flavor, target.model, spec)
    result = RequestResult(expected_tokens=spec.max_tokens)
    start = time.perf_counter()
    finished = False
    try:
        async with http.stream("POST", "/v1/chat/completions", json=body) as resp:
            if resp.status_code != 200:
                text = (await resp.aread()).decode(errors="replace")
                return _failed(result, f"HTTP {resp.status_code}", text)
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    finished = True
                    break
                event = json.loads(data)
                if "error" in event:
                    return _failed(result, "stream error", data)
                now = time.perf_counter() - start
                for choice in event.get("choices") or []:
                    if (choice.get("delta") or {}).get("content"):
                        result.chunk_times.append(now)
                    finished = finished or choice.get("finish_reason") is not None
                usage = event.get("usage")
                if usage:
                    result.output_tokens = int(usage["completion_tokens"])
                    result.prompt_tokens = int(usage["prompt_tokens"])
                    result.tokens_from_usage = True
    except httpx.TimeoutException as exc:
        return _failed(result, "timeout", repr(exc))
    except httpx.ConnectError as exc:
        return _failed(result, "connection error", repr(exc))
    except (httpx.RemoteProtocolError, httpx.ReadError) as exc:
        return _failed(result, "connection dropped", repr(exc))
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        return _failed(result, "malformed stream", repr(exc))
    result.e2e = time.perf_counter() - start
    if not finished:
        return _failed(result, "incomplete stream", "no finish_reason and no [DONE]")
    if not result.chunk_times:
        return _failed(result, "no text", "the stream finished without any text")
    result.ttft = result.chunk_times[0]
    if not result.tokens_from_usage:
        result.output_tokens = len(result.chunk_times)
    return result


def _failed(result: RequestResult, kind: str, message: str) -> RequestResult:
    result.error, result.error_message = kind, message[:300]
    return result
