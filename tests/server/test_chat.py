"""Chat and completions through the app with a FakeEngine and the real processor: shapes, SSE framing, usage,
logprobs, media, and what reaches the engine."""

from __future__ import annotations

import json

import torch

from tests.server import media
from tests.server.conftest import MODEL_NAME, chat_body
from tests.server.fake_engine import WORD_IDS, WORDS

FULL_TEXT = "".join(WORDS)


def sse_events(response) -> list[str]:
    """The data payloads of an SSE body, checking the exact `data: ...\\n\\n` framing."""
    body = response.text
    assert body.endswith("data: [DONE]\n\n")
    events = [e for e in body.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events)
    return [e[len("data: ") :] for e in events]


def chunks_of(response) -> list[dict]:
    payloads = sse_events(response)
    assert payloads[-1] == "[DONE]"
    return [json.loads(p) for p in payloads[:-1]]


def test_non_streaming_chat_has_openai_shape_and_exact_usage(client, fake, processor):
    resp = client.post("/v1/chat/completions", json=chat_body("Hello!"))
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["id"].startswith("chatcmpl-") and body["object"] == "chat.completion"
    assert body["model"] == MODEL_NAME and isinstance(body["created"], int)
    (choice,) = body["choices"]
    assert choice["index"] == 0 and choice["finish_reason"] == "stop" and choice["logprobs"] is None
    assert choice["message"] == {"role": "assistant", "content": FULL_TEXT, "refusal": None}
    prompt = processor.process_chat([{"role": "user", "content": "Hello!"}])
    assert body["usage"] == {
        "prompt_tokens": len(prompt.token_ids),
        "completion_tokens": len(WORDS),
        "total_tokens": len(prompt.token_ids) + len(WORDS),
        "prompt_tokens_details": None,  # cached_tokens are hidden unless --report-cached-tokens
    }
    (request,) = fake.submitted
    assert request.prompt_token_ids == prompt.token_ids and request.mm_inputs == []
    assert request.sampling.temperature == 0.0  # greedy
    assert request.sampling.max_tokens == 2048  # no max_tokens: the server's default output budget
    assert request.arrival_time > 0


def test_streaming_chat_framing_and_deltas_match_non_streaming(client):
    params = {"stream": True, "stream_options": {"include_usage": True}}
    resp = client.post("/v1/chat/completions", json=chat_body("Hello!", **params))
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("text/event-stream")
    chunks = chunks_of(resp)
    ids = {c["id"] for c in chunks}
    assert len(ids) == 1 and ids.pop().startswith("chatcmpl-")
    assert all(c["object"] == "chat.completion.chunk" and c["model"] == MODEL_NAME for c in chunks)
    first, *content, finish, usage = chunks
    assert first["choices"] == [
        {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
    ]
    assert all(
        c["choices"][0]["finish_reason"] is None and "role" not in c["choices"][0]["delta"] for c in content
    )
    assert "".join(c["choices"][0]["delta"]["content"] for c in content) == FULL_TEXT
    assert finish["choices"] == [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}]
    assert all(c["usage"] is None for c in chunks[:-1])  # "usage": null until the usage chunk
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == len(WORDS)
    plain = client.post("/v1/chat/completions", json=chat_body("Hello!")).json()
    assert usage["usage"] == plain["usage"]


def test_stream_without_include_usage_has_no_usage_field(client):
    chunks = chunks_of(client.post("/v1/chat/completions", json=chat_body("Hi", stream=True)))
    assert all("usage" not in c for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


def test_n_choices_carry_their_index_and_usage_sums_them(client, fake):
    body = chat_body("Hi", n=3, max_tokens=4, temperature=0.8, seed=1)
    resp = client.post("/v1/chat/completions", json=body).json()
    assert [c["index"] for c in resp["choices"]] == [0, 1, 2]
    assert all(c["message"]["content"] == "".join(WORDS[:4]) for c in resp["choices"])
    assert all(c["finish_reason"] == "length" for c in resp["choices"])
    assert resp["usage"]["completion_tokens"] == 3 * 4
    assert fake.submitted[-1].sampling.n == 3 and fake.submitted[-1].sampling.seed == 1

    chunks = chunks_of(client.post("/v1/chat/completions", json={**body, "stream": True}))
    roles = [c for c in chunks if c["choices"][0]["delta"].get("role")]
    assert [c["choices"][0]["index"] for c in roles] == [0, 1, 2]
    for i in range(3):
        deltas = [
            c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"][0]["index"] == i
        ]
        assert "".join(deltas) == "".join(WORDS[:4])


def test_chat_logprobs_use_openai_chat_format(client):
    resp = client.post(
        "/v1/chat/completions", json=chat_body("Hi", max_tokens=3, logprobs=True, top_logprobs=2)
    )
    content = resp.json()["choices"][0]["logprobs"]["content"]
    assert [e["token"] for e in content] == WORDS[:3]
    first = content[0]
    assert first["logprob"] == -0.25 and first["bytes"] == list(b"The")
    assert first["top_logprobs"] == [
        {"token": "The", "logprob": -0.25, "bytes": list(b"The")},
        {"token": ".", "logprob": -1.75, "bytes": list(b".")},
    ]
    assert content[1]["bytes"] == list(b" quick")  # byte-level "Ġquick" mapped back to raw bytes
    chunks = chunks_of(
        client.post("/v1/chat/completions", json=chat_body("Hi", max_tokens=3, logprobs=True, stream=True))
    )
    streamed = [c["choices"][0]["logprobs"] for c in chunks if c["choices"][0]["delta"].get("content")]
    assert [lp["content"][0]["token"] for lp in streamed] == WORDS[:3]
    assert all(lp["content"][0]["top_logprobs"] == [] for lp in streamed)  # top_logprobs unset -> 0


def test_image_data_url_becomes_mm_input_with_exact_token_count(client, fake, processor):
    png = media.png(500, 450)
    content = [media.image_part(media.data_url(png)), {"type": "text", "text": "Describe it."}]
    resp = client.post("/v1/chat/completions", json=chat_body(content))
    assert resp.status_code == 200, resp.text
    (request,) = fake.submitted
    (mm,) = request.mm_inputs
    assert (
        mm.kind == "image" and mm.pixels.dtype == torch.uint8 and tuple(mm.pixels.shape) == (5, 3, 448, 448)
    )
    assert (
        mm.length == 5 * 256
        and request.prompt_token_ids[mm.offset : mm.offset + mm.length] == [128002] * 1280
    )
    from plm_serve.processors import ImageInput

    expected = processor.process_chat(
        [{"role": "user", "content": [ImageInput(png), {"type": "text", "text": "Describe it."}]}]
    )
    assert resp.json()["usage"]["prompt_tokens"] == len(expected.token_ids) == len(request.prompt_token_ids)
    assert mm.content_hash == expected.media[0].content_hash


def test_image_detail_low_is_one_tile(client, fake):
    content = [
        media.image_part(media.data_url(media.png(500, 450)), detail="low"),
        {"type": "text", "text": "?"},
    ]
    assert client.post("/v1/chat/completions", json=chat_body(content)).status_code == 200
    (mm,) = fake.submitted[0].mm_inputs
    assert mm.pixels.shape[0] == 1 and mm.length == 256


def test_video_data_url_samples_the_requested_frames(client, fake):
    video = media.data_url(media.mp4(num_frames=6), "video/mp4")
    content = [media.video_part(video, num_frames=2), {"type": "text", "text": "What happens?"}]
    resp = client.post("/v1/chat/completions", json=chat_body(content))
    assert resp.status_code == 200, resp.text
    (mm,) = fake.submitted[0].mm_inputs
    assert mm.kind == "video" and tuple(mm.pixels.shape) == (2, 3, 448, 448) and mm.length == 2 * 256


def test_max_tokens_gives_finish_reason_length_and_cached_tokens_are_reported(make_client, fake):
    fake.num_cached_tokens = 32
    client = make_client(report_cached_tokens=True)
    body = client.post("/v1/chat/completions", json=chat_body("Hi", max_completion_tokens=2)).json()
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["choices"][0]["message"]["content"] == "The quick"
    assert body["usage"]["prompt_tokens_details"] == {"cached_tokens": 32}
    hidden = make_client().post("/v1/chat/completions", json=chat_body("Hi", max_tokens=2)).json()
    assert hidden["usage"]["prompt_tokens_details"] is None  # the default: no cross-client cache oracle


def test_system_and_assistant_turns_reach_the_template(client, fake, processor):
    messages = [
        {"role": "developer", "content": "Be terse."},
        {"role": "user", "content": [{"type": "text", "text": "Hi"}]},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Again"},
    ]
    assert (
        client.post("/v1/chat/completions", json={"messages": messages}).status_code == 200
    )  # model optional
    assert fake.submitted[0].prompt_token_ids == processor.process_chat(messages).token_ids


def test_completions_text_prompt(client, fake, processor):
    resp = client.post("/v1/completions", json={"model": MODEL_NAME, "prompt": "Once upon", "max_tokens": 3})
    body = resp.json()
    assert body["id"].startswith("cmpl-") and body["object"] == "text_completion"
    assert body["choices"] == [
        {"text": "The quick brown", "index": 0, "logprobs": None, "finish_reason": "length"}
    ]
    expected = processor.process_prompt("Once upon").token_ids
    assert fake.submitted[0].prompt_token_ids == expected
    assert body["usage"]["prompt_tokens"] == len(expected) and body["usage"]["completion_tokens"] == 3


def test_completions_list_of_prompts_and_token_ids(client, fake):
    body = {"prompt": [[128000, 9906], [128000, 1917, 1917]], "n": 2, "max_tokens": 2}
    resp = client.post("/v1/completions", json=body).json()
    assert [c["index"] for c in resp["choices"]] == [0, 1, 2, 3]
    assert resp["usage"]["prompt_tokens"] == 5 and resp["usage"]["completion_tokens"] == 8
    assert sorted(r.prompt_token_ids for r in fake.submitted) == [[128000, 1917, 1917], [128000, 9906]]
    assert len({r.request_id for r in fake.submitted}) == 2

    chunks = chunks_of(client.post("/v1/completions", json={**body, "stream": True}))
    assert all(c["object"] == "text_completion" for c in chunks)
    for i in range(4):
        texts = [c["choices"][0]["text"] for c in chunks if c["choices"][0]["index"] == i]
        assert "".join(texts) == "The quick"


def test_completions_legacy_logprobs(client):
    resp = client.post("/v1/completions", json={"prompt": "x", "max_tokens": 3, "logprobs": 1}).json()
    lp = resp["choices"][0]["logprobs"]
    assert lp["tokens"] == WORDS[:3] and lp["token_logprobs"] == [-0.25] * 3
    assert lp["text_offset"] == [0, 3, 9] and lp["top_logprobs"][0] == {"The": -0.25}


def test_models_version_health_metrics(client):
    models = client.get("/v1/models").json()
    assert models["object"] == "list" and models["data"][0]["id"] == MODEL_NAME
    assert models["data"][0]["object"] == "model" and models["data"][0]["max_model_len"] == 4096
    assert client.get("/version").json()["version"]
    assert client.get("/health").json() == {"status": "ok"}
    client.post("/v1/chat/completions", json=chat_body("Hi", stream=True))
    text = client.get("/metrics").text
    for name in [
        'plm_http_requests_total{route="/v1/chat/completions",status="200"} 1.0',
        "plm_time_to_first_token_seconds_count 1.0",
        "plm_time_per_output_token_seconds_count 1.0",
        "plm_e2e_request_latency_seconds_count 1.0",
        "plm_request_queue_time_seconds_count 1.0",
        'plm_request_success_total{finish_reason="stop"} 1.0',
        f"plm_generation_tokens_total {float(len(WORDS))}",
        "plm_num_requests_running 0.0",
        "plm_kv_cache_usage_perc 0.0",
        "plm_prefix_cache_hit_rate 0.4",
        "plm_encoder_cache_hit_rate 0.25",
        "plm_engine_healthy 1.0",
    ]:
        assert name in text, name


def test_token_bytes_cover_partial_utf8(processor):
    from plm_serve.processors import TokenBytes

    token_bytes = TokenBytes(processor.tokenizer)
    ids = processor.tokenizer.encode("日本", add_special_tokens=False).ids
    assert b"".join(bytes(token_bytes(i, "?")) for i in ids) == "日本".encode()
    assert token_bytes(128009, "<|eot_id|>") == list(b"<|eot_id|>")
    assert [processor.tokenizer.encode(w, add_special_tokens=False).ids for w in WORDS] == [
        [i] for i in WORD_IDS
    ]
    assert [bytes(token_bytes(i, "?")).decode() for i in WORD_IDS] == WORDS
