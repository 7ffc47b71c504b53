"""A live plm-serve on loopback (uvicorn in a thread, the real engine, the tiny checkpoint) for the benchmark."""

from __future__ import annotations

import asyncio
import socket
import threading
import time

import httpx
import pytest
import uvicorn

from plm_serve.engine import AsyncEngine, EngineConfig
from plm_serve.server.app import create_app
from plm_serve.server.config import ServerConfig

MODEL = "plm-tiny"


@pytest.fixture(scope="module")
def live_url(ckpt_l):
    engine_args = {"device": "cpu", "dtype": "float32", "num_kv_blocks": 1024, "max_num_batched_tokens": 4096}
    engine = AsyncEngine.from_config(EngineConfig(model=str(ckpt_l), **engine_args))
    app = create_app(ServerConfig(model=str(ckpt_l), served_model_name=MODEL), engine)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError("the test server did not become healthy")
            time.sleep(0.05)
        yield url
    finally:
        server.should_exit = True
        thread.join(30)
        asyncio.run(engine.shutdown(1.0))
