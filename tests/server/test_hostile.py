"""The hostile corpus (tests/server/hostile.py) against the app: every case is a 4xx with OpenAI's error body and
`X-Request-Id`, nothing reaches the 500 path, and the server answers normally afterwards."""

from __future__ import annotations

import pytest

from plm_serve.server.media_fetch import MediaFetcher
from plm_serve.server.protocol import ErrorResponse
from tests.server import hostile
from tests.server.conftest import chat_body

CORPUS = hostile.corpus()


@pytest.fixture(scope="module")
def shared_client(ckpt_l, processor):
    """One app for the whole corpus (built once: the corpus has hundreds of cases)."""
    from fastapi.testclient import TestClient

    from plm_serve.server.app import create_app
    from plm_serve.server.config import ServerConfig
    from tests.server.conftest import MODEL_NAME, internal_errors
    from tests.server.fake_engine import FakeEngine

    config = ServerConfig(model=str(ckpt_l), served_model_name=MODEL_NAME)
    app = create_app(config, FakeEngine(), processor=processor)
    ctx = app.state.ctx
    ctx.fetcher = MediaFetcher(
        config, resolver=hostile.hostile_resolver, transport=hostile.hostile_transport()
    )
    with TestClient(app, raise_server_exceptions=False) as client:
        yield client
        assert internal_errors(app) == 0, "a hostile request reached the 500 path"


def assert_openai_error(resp, case: hostile.Case) -> None:
    assert 400 <= resp.status_code < 500, f"{case.name}: {resp.status_code} {resp.text[:300]}"
    body = resp.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    ErrorResponse.model_validate(body)
    assert body["error"]["message"], case.name
    assert resp.headers.get("x-request-id"), f"{case.name}: no X-Request-Id"
    assert resp.headers.get("connection") != "close", f"{case.name}: a 4xx needs no new connection"


def test_the_corpus_is_large_and_covers_every_class():
    names = [c.name for c in CORPUS]
    assert len(names) > 500 and len(set(names)) == len(names)
    for word in ["Infinity", "surrogate", "UTF-8", "http://[::1", "bomb", "fps", "deep", "placeholder"]:
        assert any(word in n for n in names), word


@pytest.mark.parametrize("case", CORPUS, ids=[c.name for c in CORPUS])
def test_hostile_request_is_a_4xx_with_an_openai_error(shared_client, case):
    assert_openai_error(shared_client.request(**case.request_kwargs()), case)


@pytest.mark.parametrize("case", hostile.BENIGN, ids=[c.name for c in hostile.BENIGN])
def test_strange_but_valid_requests_succeed(shared_client, case):
    resp = shared_client.request(**case.request_kwargs())
    assert resp.status_code == 200, f"{case.name}: {resp.text[:300]}"


def test_the_server_is_healthy_after_the_corpus(shared_client):
    for case in CORPUS[::7]:
        shared_client.request(**case.request_kwargs())
    assert shared_client.get("/health").status_code == 200
    resp = shared_client.post("/v1/chat/completions", json=chat_body("still there?", max_tokens=2))
    assert resp.status_code == 200 and resp.json()["choices"][0]["message"]["content"] == "The quick"


def test_text_that_cannot_fit_is_refused_from_its_size_before_tokenization(
    shared_client, processor, monkeypatch
):
    """50 MB of text once took 72 s to reach its 400 (tokenized whole, holding the GIL): now no tokenizer runs."""
    calls = []
    monkeypatch.setattr(processor.template_tokenizer, "encode", lambda *a: calls.append(a) or [])
    resp = shared_client.post("/v1/chat/completions", json=chat_body("word " * 10_000_000))
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "messages", resp.text[:200]
    assert "characters" in resp.json()["error"]["message"] and calls == []


def test_a_decompression_bomb_gets_our_own_message(shared_client):
    image = hostile.media.image_part(hostile.media.data_url(hostile.png_header(20_000, 20_000)))
    err = shared_client.post("/v1/chat/completions", json=chat_body([image])).json()["error"]
    assert (
        "pixel limit" in err["message"] and "DOS" not in err["message"] and err["code"] == "media_too_large"
    )
