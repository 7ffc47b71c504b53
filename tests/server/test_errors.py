"""Every error class: its status, OpenAI's error body, and a server that still answers afterwards."""

from __future__ import annotations

import pytest

from plm_serve.engine import EngineDeadError, RequestRejectedError
from plm_serve.processors import MediaLimits
from plm_serve.server.protocol import ErrorResponse
from tests.server import media
from tests.server.conftest import MODEL_NAME, chat_body
from tests.server.fake_engine import FakeEngine, overloaded


def assert_error(resp, status: int, param: str | None = None, code: str | None = None) -> dict:
    assert resp.status_code == status, resp.text
    error = ErrorResponse.model_validate(resp.json()).error  # exactly {"error": {message, type, param, code}}
    assert set(resp.json()["error"]) == {"message", "type", "param", "code"}
    assert error.message
    if param is not None:
        assert error.param == param, error
    if code is not None:
        assert error.code == code, error
    return resp.json()["error"]


def still_serves(client) -> None:
    resp = client.post("/v1/chat/completions", json=chat_body("still there?", max_tokens=2))
    assert resp.status_code == 200 and resp.json()["choices"][0]["message"]["content"] == "The quick"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (chat_body("Hi", temperature=3), "temperature"),
        (chat_body("Hi", n=0), "n"),
        (chat_body("Hi", max_tokens=0), "max_tokens"),
        (chat_body("Hi", top_logprobs=50, logprobs=True), "top_logprobs"),
        (chat_body("Hi", logit_bias={"1": 500}), "logit_bias"),
        (chat_body("Hi", stop=5), "stop"),
        ({"model": MODEL_NAME, "messages": []}, "messages"),
        ({"model": MODEL_NAME}, "messages"),
        ({"messages": [{"role": "function", "content": "x"}]}, "messages[0].role"),
        (chat_body([{"type": "image_url", "image_url": {"url": "x", "detail": "max"}}]), None),
        (chat_body([{"type": "input_audio", "input_audio": {}}]), "messages[0].content[0]"),
        (
            chat_body("Hi", tools=[{"type": "function", "function": {"name": "a b"}}]),
            "tools[0].function.name",
        ),
        (chat_body("Hi", tool_choice="required"), "tool_choice"),
        (chat_body("Hi", response_format={"type": "json_schema"}), "response_format.json_schema"),
        (chat_body("Hi", response_format={"type": "json_object"}, guided_regex="a+"), "guided_regex"),
    ],
)
def test_invalid_parameters_are_400_with_param(client, body, param):
    err = assert_error(client.post("/v1/chat/completions", json=body), 400, param)
    assert err["type"] == "invalid_request_error"
    still_serves(client)


def test_detail_error_points_into_the_content_part(client):
    body = chat_body([{"type": "image_url", "image_url": {"url": "x", "detail": "max"}}])
    assert_error(
        client.post("/v1/chat/completions", json=body), 400, "messages[0].content[0].image_url.detail"
    )


def test_malformed_json_and_non_json_bodies_are_400(client):
    headers = {"content-type": "application/json"}
    assert_error(
        client.post("/v1/chat/completions", content=b'{"messages": [', headers=headers),
        400,
        code="invalid_json",
    )
    assert_error(client.post("/v1/chat/completions", content=b"[1, 2]", headers=headers), 400)
    assert_error(client.post("/v1/chat/completions", content=b"messages=hi"), 400)
    assert_error(client.post("/v1/completions", json={"prompt": [1.5]}), 400, "prompt[0]")
    assert_error(client.post("/v1/completions", json={"prompt": []}), 400, "prompt")
    assert_error(client.post("/v1/completions", json={"prompt": [999999]}), 400, "prompt")
    still_serves(client)


def test_unknown_model_is_404(client):
    err = assert_error(
        client.post("/v1/chat/completions", json={**chat_body("Hi"), "model": "gpt-4o"}), 404, "model"
    )
    assert err["code"] == "model_not_found"
    assert_error(client.post("/v1/completions", json={"model": "nope", "prompt": "x"}), 404, "model")
    assert_error(client.get("/v1/nothing"), 404)
    assert_error(client.get("/v1/chat/completions"), 405)
    still_serves(client)


def test_oversized_bodies_are_413(make_client):
    client = make_client(max_request_body_bytes=4096)
    big = chat_body("x" * 5000)
    assert_error(client.post("/v1/chat/completions", json=big), 413, code="request_too_large")

    def chunked():  # no Content-Length: the limit is enforced on the streamed bytes
        yield b'{"messages": [{"role": "user", "content": "'
        for _ in range(10):
            yield b"x" * 1000
        yield b'"}]}'

    headers = {"content-type": "application/json"}
    assert_error(client.post("/v1/chat/completions", content=chunked(), headers=headers), 413)
    still_serves(client)


def test_oversized_and_too_many_media_are_413(make_client):
    client = make_client(media=MediaLimits(max_image_bytes=1000, max_media_per_request=2))
    big = media.data_url(media.png(256, 256, seed=3))  # a noisy PNG well over 1000 bytes
    content = [media.image_part(big), {"type": "text", "text": "?"}]
    assert_error(client.post("/v1/chat/completions", json=chat_body(content)), 413, code="media_too_large")
    small = media.image_part(media.data_url(media.png(8, 8)))
    assert_error(client.post("/v1/chat/completions", json=chat_body([small] * 3)), 413, "messages")
    still_serves(client)


def test_undecodable_media_is_400_pointing_at_the_part(client):
    junk = media.image_part("data:image/png;base64," + "QUJD" * 10)
    content = [{"type": "text", "text": "look"}, junk]
    err = assert_error(client.post("/v1/chat/completions", json=chat_body(content)), 400)
    assert err["param"].startswith("messages[0].content[1]")
    bad_b64 = media.image_part("data:image/png;base64,@@@")
    assert_error(
        client.post("/v1/chat/completions", json=chat_body([bad_b64])),
        400,
        "messages[0].content[0].image_url.url",
    )
    bad_video = media.video_part("data:video/mp4;base64," + "QUJD" * 10)
    assert_error(client.post("/v1/chat/completions", json=chat_body([bad_video])), 400)
    assert_error(
        client.post("/v1/chat/completions", json=chat_body([media.image_part("ftp://x/y.png")])), 400
    )
    still_serves(client)


def test_prompt_too_long_says_tokens_per_image_and_suggests_detail_low(make_client):
    client = make_client(engine=FakeEngine(max_model_len=2048))
    content = [media.image_part(media.data_url(media.png(500, 450))), {"type": "text", "text": "Describe."}]
    err = assert_error(client.post("/v1/chat/completions", json=chat_body(content, max_tokens=1000)), 400)
    assert "1280 tokens" in err["message"] and 'detail: "low"' in err["message"]
    ok = [media.image_part(media.data_url(media.png(500, 450)), detail="low"), {"type": "text", "text": "?"}]
    assert client.post("/v1/chat/completions", json=chat_body(ok, max_tokens=1000)).status_code == 200
    assert_error(
        client.post("/v1/chat/completions", json=chat_body("Hi", max_tokens=2048)), 400, "max_tokens"
    )
    assert_error(client.post("/v1/completions", json={"prompt": "a " * 3000}), 400, "prompt")
    still_serves(client)


def test_api_key_is_required_on_v1_only(make_client):
    client = make_client(api_key="sekret")
    assert_error(client.post("/v1/chat/completions", json=chat_body("Hi")), 401, code="invalid_api_key")
    wrong = {"Authorization": "Bearer nope"}
    assert_error(client.post("/v1/chat/completions", json=chat_body("Hi"), headers=wrong), 401)
    assert_error(client.get("/v1/models"), 401)
    assert client.get("/health").status_code == 200 and client.get("/metrics").status_code == 200
    assert client.get("/version").status_code == 200
    good = {"Authorization": "Bearer sekret"}
    assert client.post("/v1/chat/completions", json=chat_body("Hi"), headers=good).status_code == 200
    # the key is checked before the body is parsed: an unauthenticated bad body is still a 401
    assert_error(
        client.post("/v1/chat/completions", content=b"{", headers={"content-type": "application/json"}), 401
    )


@pytest.mark.parametrize(
    ("failure", "status", "code"),
    [
        (overloaded(), 429, "engine_overloaded"),
        (EngineDeadError("the engine loop died"), 503, "engine_unavailable"),
        (RequestRejectedError("prompt + max_tokens exceeds max_model_len"), 400, "request_rejected"),
    ],
)
def test_engine_errors_map_to_statuses(make_client, fake, failure, status, code):
    fake.fail_with = failure
    client = make_client()
    for stream in (False, True):
        resp = client.post("/v1/chat/completions", json=chat_body("Hi", stream=stream))
        assert_error(resp, status, code=code)
    if status == 429:
        assert resp.headers["retry-after"] == "1"
    fake.fail_with = None
    still_serves(client)


def test_engine_failure_mid_request(make_client, fake):
    fake.error_at_step = 2
    client = make_client()
    err = assert_error(client.post("/v1/chat/completions", json=chat_body("Hi")), 500)
    assert err["type"] == "server_error" and "boom" in err["message"]
    resp = client.post("/v1/chat/completions", json=chat_body("Hi", stream=True))
    assert resp.status_code == 200  # already streaming: the error comes in-band, then [DONE]
    events = resp.text.split("\n\n")
    assert '"error"' in events[-3] and events[-2] == "data: [DONE]"
    fake.error_at_step = None
    still_serves(client)


def test_health_is_503_while_loading_or_dead(make_client, fake):
    client = make_client()
    assert client.get("/health").status_code == 200
    fake.is_healthy = False
    assert client.get("/health").status_code == 503
    assert_error(client.post("/v1/chat/completions", json=chat_body("Hi")), 503, code="engine_unavailable")
    ctx = client.app.state.ctx
    ctx.engine, ctx.load_error = None, None  # as during start-up
    resp = client.get("/health")
    assert resp.status_code == 503 and "loading" in resp.json()["reason"]
    assert_error(client.post("/v1/completions", json={"prompt": "x"}), 503)
    assert client.get("/v1/models").status_code == 200  # still lists the model while loading


def test_unexpected_exception_is_a_500_envelope(make_client, processor):
    class Broken:
        tokenizer = processor.tokenizer

        def process_chat(self, *args, **kwargs):
            raise RuntimeError("bug")

    client = make_client(proc=Broken())
    err = assert_error(client.post("/v1/chat/completions", json=chat_body("Hi")), 500, code="internal_error")
    assert err["message"] == "internal server error"  # no internals leak
    from tests.server.conftest import internal_errors

    assert internal_errors(client.app) == 1
    assert err and client.post("/v1/chat/completions", json=chat_body("Hi")).headers["connection"] == "close"
    client.app.state.ctx.metrics.internal_errors.labels("server")._value.set(
        0
    )  # expected; the fixture checks the rest


def test_every_response_carries_a_request_id(client):
    ok = client.get("/v1/models", headers={"X-Request-Id": "trace-42"})
    assert ok.headers["x-request-id"] == "trace-42"
    bad = client.post("/v1/chat/completions", content=b"{not json", headers={"X-Request-Id": "bad id\n"})
    assert bad.status_code == 400
    generated = bad.headers["x-request-id"]
    assert len(generated) == 32 and generated != "bad id\n"  # an unsafe client value is replaced
    assert client.get("/health").headers["x-request-id"] != generated
