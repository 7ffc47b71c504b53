"""ServerConfig: the HTTP-side settings, built once by the CLI (or a test) and never mutated.

Engine settings live in `engine.EngineConfig` (carried here as `engine`); everything about HTTP, auth, media
fetching and shutdown lives here. Nothing in this module reads the environment: `server/__main__.py` does.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from plm_serve.engine import EngineConfig

MiB = 1024 * 1024


@dataclass(frozen=True, slots=True)
class ServerConfig:
    """Settings of the OpenAI-compatible frontend, validated in `__post_init__` (actionable ValueErrors)."""

    model: str
    """Path of the checkpoint folder (weights, tokenizer, processor files)."""

    engine: EngineConfig | None = None
    """How to build the engine in the lifespan; None when a test injects an engine into `create_app`."""

    served_model_name: str | None = None
    """The model id clients send and see; None = the checkpoint folder's name."""

    host: str = "127.0.0.1"
    port: int = 8000

    api_key: str | None = None
    """When set, every /v1 route needs `Authorization: Bearer <api_key>`; /health, /metrics, /version stay
    open."""

    max_request_body_bytes: int = 128 * MiB
    """Largest HTTP body of a route that carries media (/v1/chat/completions; 413 beyond). Base64 inflates
    media by 4/3: keep it above max_video_bytes."""

    max_text_request_body_bytes: int = 16 * MiB
    """Largest HTTP body of every other route (text and token ids only, e.g. /v1/completions; 413 beyond).
    A context of 11520 tokens is well under 1 MB of text."""

    request_read_timeout_s: float = 60.0
    """The whole request body must arrive within this time (408 beyond): a slow upload cannot hold a
    connection and its buffer indefinitely."""

    header_read_timeout_s: float = 10.0
    """A connection must deliver a complete request line and headers within this time of opening (or of its
    previous response), else it is closed: no slowloris."""

    keep_alive_timeout_s: float = 5.0
    """An idle kept-alive connection is closed after this long."""

    max_n: int = 16
    """Most choices (`n`) one request may ask for; with /v1/completions, n times the number of prompts. Each
    choice is a sequence holding KV blocks and a slot in every decode step."""

    max_prompts_per_request: int = 64
    """Most prompts in one /v1/completions request."""

    default_max_tokens: int | None = 2048
    """Output budget of a request that gives no max_tokens (capped by what the context leaves); None: up to
    the context length. Keeps one forgetful client from generating 11k tokens on a shared server."""

    max_tokens_limit: int | None = None
    """Largest max_tokens a request may ask for (400 beyond); None: the context length is the only limit."""

    max_logprobs: int = 20
    """Most alternatives per token a request may ask for (top_logprobs; `logprobs` of /v1/completions)."""

    report_cached_tokens: bool = False
    """Report `usage.prompt_tokens_details.cached_tokens`. Off by default: on a shared server the count tells
    a client whether someone else recently sent the same prefix (salting per API key or with `cache_salt`
    scopes the cache itself; see docs/hardening.md)."""

    prefix_cache_per_api_key: bool = True
    """Salt prefix-cache hashes with the request's bearer token, so requests under different API keys (e.g.
    tenants behind a gateway) never share KV blocks. Requests without a key, or with the same key, share."""

    control_tokens_in_messages: bool = False
    """The old behaviour: special-token strings inside message text (`<|eot_id|>`, ...) become control
    tokens. Off: they are tokenized as the text they are, and only the chat template's own markers are
    special."""

    max_image_bytes: int = 20 * MiB
    max_image_pixels: int = 50_000_000
    max_video_bytes: int = 64 * MiB
    max_video_frames: int = 64
    default_video_frames: int = 32
    max_media_per_request: int = 8

    media_fetch_timeout_s: float = 20.0
    """Whole-download deadline for an http(s) media URL (the connect timeout is the smaller of this and 5
    s)."""

    max_media_redirects: int = 3
    allow_private_media_urls: bool = False
    """Allow http(s) media URLs that resolve to private, loopback, link-local or other non-public
    addresses."""

    allowed_local_media_path: str | None = None
    """Directory from which `file://` URLs and plain paths may be read; None = local files are refused."""

    preprocess_workers: int = 2
    """Threads that decode and tile media off the event loop (more threads mostly fight over the GIL)."""

    shutdown_grace_seconds: float = 30.0
    """On SIGTERM: time running requests get to finish before they are aborted."""

    def __post_init__(self) -> None:
        checks = [
            (bool(self.model), "model must be the path of a checkpoint folder"),
            (0 <= self.port <= 65535, f"port={self.port}: use 0..65535"),
            (
                self.api_key is None or bool(self.api_key),
                "api_key must not be empty (leave it unset instead)",
            ),
            (self.max_request_body_bytes >= 1024, "max_request_body_bytes must be at least 1024"),
            (self.max_text_request_body_bytes >= 1024, "max_text_request_body_bytes must be at least 1024"),
            (self.request_read_timeout_s > 0, "request_read_timeout_s must be > 0"),
            (self.header_read_timeout_s > 0, "header_read_timeout_s must be > 0"),
            (self.keep_alive_timeout_s > 0, "keep_alive_timeout_s must be > 0"),
            (1 <= self.max_n <= 128, f"max_n={self.max_n}: use 1..128"),
            (self.max_prompts_per_request >= 1, "max_prompts_per_request must be at least 1"),
            (
                self.default_max_tokens is None or self.default_max_tokens >= 1,
                "default_max_tokens must be at least 1 (or unset: up to the context length)",
            ),
            (
                self.max_tokens_limit is None or self.max_tokens_limit >= 1,
                "max_tokens_limit must be at least 1 (or unset: the context length)",
            ),
            (0 <= self.max_logprobs <= 20, f"max_logprobs={self.max_logprobs}: use 0..20"),
            (self.media_fetch_timeout_s > 0, "media_fetch_timeout_s must be > 0"),
            (self.max_media_redirects >= 0, "max_media_redirects must be >= 0"),
            (self.preprocess_workers >= 1, "preprocess_workers must be at least 1"),
            (self.shutdown_grace_seconds >= 0, "shutdown_grace_seconds must be >= 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"invalid server config: {message}")
        if self.allowed_local_media_path is not None and not Path(self.allowed_local_media_path).is_dir():
            raise ValueError(
                f"invalid server config: allowed_local_media_path={self.allowed_local_media_path!r} "
                "is not a directory"
            )

    @property
    def model_name(self) -> str:
        """The id of the served model: `served_model_name`, else the checkpoint folder's name."""
        return self.served_model_name or Path(self.model.rstrip("/\\")).name or self.model

    def replace(self, **changes: Any) -> ServerConfig:
        return dataclasses.replace(self, **changes)


def server_field_names() -> set[str]:
    """Names a YAML preset or the CLI may set on ServerConfig (the engine section is separate)."""
    return {f.name for f in dataclasses.fields(ServerConfig)} - {"engine"}
