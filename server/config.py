"""ServerConfig: the HTTP-side settings, built once by the CLI (or a test) and never mutated.

Engine settings live in `engine.EngineConfig` (carried here as `engine`), per-request media limits in
`processors.MediaLimits` (carried as `media`); everything about HTTP, auth, media fetching and shutdown lives here.
The field docstrings are the CLI's help (server/flags.py). Nothing in this module reads the environment:
`server/__main__.py` does.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from plm_serve.processors import MediaLimits

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

    media: MediaLimits = field(default_factory=MediaLimits)
    """Per-request media limits (their own flags: --max-image-bytes, --max-video-frames, ...)."""

    host: str = "127.0.0.1"
    """Address to bind (0.0.0.0 to listen on every interface)."""

    port: int = 8000
    """TCP port to listen on."""

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

    media_fetch_timeout_s: float = 20.0
    """Whole-download deadline for an http(s) media URL (the connect timeout is the smaller of this and 5
    s)."""

    max_media_redirects: int = 3
    """Redirects followed per media URL (each one re-checked against the address guard)."""

    allow_private_media_urls: bool = False
    """Allow http(s) media URLs that resolve to private, loopback, link-local or other non-public
    addresses."""

    allowed_local_media_path: str | None = None
    """Directory from which `file://` URLs and plain paths may be read; None = local files are refused."""

    chat_template: str | None = None
    """A jinja chat template replacing the checkpoint's: a file path, or the template text itself. A template
    that reads `tools` renders tools and tool messages itself; otherwise they are written in the Llama 3.1 JSON
    convention (docs/api.md)."""

    preprocess_workers: int = 2
    """Threads that decode and tile media off the event loop (more threads mostly fight over the GIL)."""

    shutdown_grace_seconds: float = 30.0
    """On SIGTERM: time running requests get to finish before they are aborted."""

    playground: bool = True
    """Serve the browser playground (a static chat page, assets inside the package) at `/`; it calls the /v1
    API like any client, so with `api_key` set the page asks for the key."""

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
        if (
            self.chat_template is not None
            and not self._inline_template()
            and not Path(self.chat_template).is_file()
        ):
            raise ValueError(
                f"invalid server config: chat_template={self.chat_template!r} is neither a file nor a jinja template"
            )
        if self.allowed_local_media_path is not None and not Path(self.allowed_local_media_path).is_dir():
            raise ValueError(
                f"invalid server config: allowed_local_media_path={self.allowed_local_media_path!r} "
                "is not a directory"
            )

    @property
    def model_name(self) -> str:
        """The id of the served model: `served_model_name`, else the checkpoint folder's name."""
        return self.served_model_name or Path(self.model.rstrip("/\\")).name or self.model

    def chat_template_source(self) -> str | None:
        """The override template's text: the file's content when `chat_template` names a file."""
        if self.chat_template is None or self._inline_template():
            return self.chat_template
        return Path(self.chat_template).read_text(encoding="utf-8")

    def _inline_template(self) -> bool:
        return self.chat_template is not None and ("{{" in self.chat_template or "{%" in self.chat_template)

    def replace(self, **changes: Any) -> ServerConfig:
        return dataclasses.replace(self, **changes)
