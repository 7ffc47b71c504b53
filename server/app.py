"""`create_app(config, engine=None)`: the FastAPI application, its lifespan and its error handling.

The lifespan starts loading the model in the background and returns at once, so the server is up (and /health
answers 503 "loading") while weights load and the KV pool is sized. Tests inject an engine and a processor
instead.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager

from fastapi import FastAPI

from plm_serve.engine import AsyncEngine, EngineClient
from plm_serve.processors import Processor
from plm_serve.server.config import ServerConfig
from plm_serve.server.deps import ServerContext
from plm_serve.server.errors import install_exception_handlers
from plm_serve.server.media_fetch import MediaFetcher
from plm_serve.server.metrics import ServerMetrics
from plm_serve.server.middleware import ApiKeyAuth, InternalErrorGuard, RequestBody, RequestCounter, RequestId
from plm_serve.server.openapi import install_openapi
from plm_serve.server.playground import router as playground_router
from plm_serve.server.routes import router
from plm_serve.server.version import VERSION

logger = logging.getLogger(__name__)


def create_app(
    config: ServerConfig,
    engine: EngineClient | None = None,
    *,
    processor: Processor | None = None,
    on_load_failure: Callable[[BaseException], None] | None = None,
) -> FastAPI:
    """The app. Without `engine`, the lifespan builds one from `config.engine` (and owns it); without
    `processor`, it loads the checkpoint's processor. `on_load_failure` lets the CLI stop the process when
    loading fails."""
    if engine is None and config.engine is None:
        raise ValueError("create_app needs an engine or config.engine to build one")
    ctx = ServerContext(
        config=config,
        metrics=ServerMetrics(lambda: ctx.engine),
        fetcher=MediaFetcher(config),
        executor=ThreadPoolExecutor(config.preprocess_workers, thread_name_prefix="plm-preprocess"),
    )

    if engine is not None and processor is not None:
        ctx.set_loaded(engine, processor)  # both injected (tests): ready before the first request

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loading = None
        if ctx.engine is None:
            loading = asyncio.create_task(_load(ctx, engine, processor, on_load_failure))
        try:
            yield
        finally:
            await _close(ctx, loading)

    app = FastAPI(title="plm-serve", version=VERSION, lifespan=lifespan)
    app.state.ctx = ctx
    app.include_router(router)
    if config.playground:
        app.include_router(playground_router)
    install_exception_handlers(app)
    install_openapi(app, config)
    # add_middleware wraps: the last added runs first.
    app.add_middleware(
        RequestBody,
        max_media_bytes=config.max_request_body_bytes,
        max_text_bytes=config.max_text_request_body_bytes,
        read_timeout_s=config.request_read_timeout_s,
    )
    app.add_middleware(ApiKeyAuth, api_key=config.api_key)
    app.add_middleware(InternalErrorGuard, metrics=ctx.metrics)
    app.add_middleware(RequestCounter, metrics=ctx.metrics)
    app.add_middleware(RequestId)
    return app


async def _load(
    ctx: ServerContext,
    engine: EngineClient | None,
    processor: Processor | None,
    on_failure: Callable[[BaseException], None] | None,
) -> None:
    """Load what was not injected, off the event loop; readiness flips when both are there."""
    cfg = ctx.config
    try:
        if processor is None:
            processor = await asyncio.to_thread(
                Processor.from_pretrained,
                cfg.model,
                limits=cfg.media,
                chat_template=cfg.chat_template_source(),
                control_tokens_in_text=cfg.control_tokens_in_messages,
            )
        if engine is None:
            assert cfg.engine is not None
            logger.info(
                "loading %s (this can take a while; /health answers 503 until it is ready)", cfg.model
            )
            engine = await asyncio.to_thread(AsyncEngine.from_config, cfg.engine)
            ctx.owns_engine = True
        ctx.set_loaded(engine, processor)
        logger.info("ready: serving %r (max_model_len %d)", ctx.model_name, engine.max_model_len)
    except Exception as exc:
        logger.exception("failed to load the model from %s", cfg.model)
        ctx.load_error = f"{type(exc).__name__}: {exc}"
        if on_failure is not None:
            on_failure(exc)


async def _close(ctx: ServerContext, loading: asyncio.Task | None) -> None:
    ctx.draining = True
    if loading is not None and not loading.done():
        loading.cancel()  # stop waiting; a load thread that is mid-way finishes on its own and is dropped
    if ctx.owns_engine and ctx.engine is not None:
        await ctx.engine.shutdown(ctx.config.shutdown_grace_seconds)
    await ctx.fetcher.aclose()
    ctx.executor.shutdown(wait=False, cancel_futures=True)


def begin_draining(app: FastAPI) -> None:
    """From now on /health and new requests answer 503 (safe in a signal handler: one attribute set)."""
    app.state.ctx.draining = True


async def drain(app: FastAPI, grace_s: float) -> None:
    """Graceful shutdown (SIGTERM): refuse new requests with 503 (/health too), give running ones `grace_s` to
    finish, then abort the rest; their streams end and their connections close."""
    ctx: ServerContext = app.state.ctx
    begin_draining(app)
    if ctx.engine is not None:
        logger.info("draining: %.0fs for running requests to finish", grace_s)
        await ctx.engine.shutdown(grace_s)
