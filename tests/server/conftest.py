"""Server test fixtures: the real processor of the tiny checkpoint, a FakeEngine, and an app factory.

Every app built through `make_client` is checked at teardown: no request may have reached the unexpected-error
handler (user input must never produce a 500).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
from fastapi.testclient import TestClient

from plm_serve.processors import Processor
from plm_serve.server.app import create_app
from plm_serve.server.config import ServerConfig
from tests.server.fake_engine import FakeEngine

MODEL_NAME = "plm-tiny"


@pytest.fixture(scope="session")
def processor(ckpt_l) -> Processor:
    return Processor.from_pretrained(ckpt_l)


@pytest.fixture
def fake() -> FakeEngine:
    return FakeEngine()


def internal_errors(app, cause: str = "server") -> float:
    """Requests that reached the 500 path (cause "server") or failed in the engine (cause "engine")."""
    sample = app.state.ctx.metrics.registry.get_sample_value("plm_internal_errors_total", {"cause": cause})
    return sample or 0.0


@pytest.fixture
def make_client(ckpt_l, processor, fake) -> Iterator[Callable[..., TestClient]]:
    """`make_client(engine=None, processor=None, **server_config)` -> a started TestClient (lifespan run)."""
    clients: list[TestClient] = []

    def make(engine=None, proc=None, **overrides) -> TestClient:
        config = ServerConfig(model=str(ckpt_l), served_model_name=MODEL_NAME, **overrides)
        app = create_app(config, engine or fake, processor=proc or processor)
        client = TestClient(app, raise_server_exceptions=False)
        client.expected_internal_errors = 0  # type: ignore[attr-defined]  # a test that provokes a 500 says so
        client.__enter__()
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.__exit__(None, None, None)
        expected = client.expected_internal_errors  # type: ignore[attr-defined]
        assert internal_errors(client.app) == expected, "a request reached the unexpected-error handler (500)"


@pytest.fixture
def client(make_client) -> TestClient:
    return make_client()


def chat_body(content, **params) -> dict:
    return {"model": MODEL_NAME, "messages": [{"role": "user", "content": content}], **params}
