"""Per-app state (`app.state.ctx`) and the FastAPI dependencies that hand it to routes.

Routes never reach for globals: they declare `ctx: CtxDep`, `engine: EngineDep`, `processor: ProcessorDep`,
and tests swap in a fake engine through `create_app(config, engine=..., processor=...)`.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Annotated

from fastapi import Depends, Request

from plm_serve.engine import EngineClient
from plm_serve.processors import Processor, TokenBytes
from plm_serve.server.config import ServerConfig
from plm_serve.server.errors import APIError, service_unavailable
from plm_serve.server.media_fetch import MediaFetcher
from plm_serve.server.metrics import ServerMetrics


@dataclass
class ServerContext:
    """Everything one app instance owns. `engine`/`processor` stay None until the lifespan has loaded them."""

    config: ServerConfig
    metrics: ServerMetrics
    fetcher: MediaFetcher
    executor: ThreadPoolExecutor  # media decoding and tiling, off the event loop
    engine: EngineClient | None = None
    processor: Processor | None = None
    token_bytes: TokenBytes | None = None
    load_error: str | None = None
    draining: bool = False
    owns_engine: bool = False  # built by the lifespan (so it shuts it down), not injected by a test
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def model_name(self) -> str:
        return self.config.model_name

    def set_loaded(self, engine: EngineClient, processor: Processor) -> None:
        self.processor = processor
        self.token_bytes = TokenBytes(processor.tokenizer)
        self.engine = engine  # last: readiness is "engine is set"

    def unavailable_reason(self) -> str | None:
        """Why requests cannot be served now (None when ready): the text of /health's 503 and of API 503s."""
        if self.draining:
            return "the server is shutting down"
        if self.load_error is not None:
            return f"the model failed to load: {self.load_error}"
        if self.engine is None:
            return "the model is still loading"
        if not self.engine.is_healthy:
            return "the engine has stopped; restart the server"
        return None


def get_ctx(request: Request) -> ServerContext:
    return request.app.state.ctx


CtxDep = Annotated[ServerContext, Depends(get_ctx)]


def get_engine(ctx: CtxDep) -> EngineClient:
    reason = ctx.unavailable_reason()
    if reason is not None or ctx.engine is None:
        raise service_unavailable(reason or "the model is still loading")
    return ctx.engine


EngineDep = Annotated[EngineClient, Depends(get_engine)]


def get_processor(ctx: CtxDep, _ready: EngineDep) -> Processor:
    assert ctx.processor is not None  # set before the engine: ready implies loaded
    return ctx.processor


ProcessorDep = Annotated[Processor, Depends(get_processor)]


def check_model(requested: str | None, ctx: ServerContext) -> None:
    """404 for a model id this server does not serve; a missing `model` means the served one."""
    if requested is not None and requested != ctx.model_name:
        raise APIError(
            404,
            f"The model `{requested}` does not exist. This server serves `{ctx.model_name}`.",
            param="model",
            code="model_not_found",
        )
