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
    """Largest HTTP body accepted (413 beyond). Base64 inflates media by 4/3: keep it above
    max_video_bytes."""

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
