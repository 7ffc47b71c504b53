"""A live plm-serve on loopback (uvicorn in a thread, the real engine, the tiny checkpoint) for the benchmark."""

from __future__ import annotations

import asyncio

import pytest

from plm_serve.engine import AsyncEngine, EngineConfig
from plm_serve.server.app import create_app
from plm_serve.server.config import ServerConfig
from tests.server.live_server import serving_in_thread

MODEL = "plm-tiny"


@pytest.fixture(scope="module")
def live_url(ckpt_l):
    engine_args = {"device": "cpu", "dtype": "float32", "num_kv_blocks": 1024, "max_num_batched_tokens": 4096}
    engine = AsyncEngine.from_config(EngineConfig(model=str(ckpt_l), **engine_args))
    app = create_app(ServerConfig(model=str(ckpt_l), served_model_name=MODEL), engine)
    try:
        with serving_in_thread(app) as url:
            yield url
    finally:
        asyncio.run(engine.shutdown(1.0))
