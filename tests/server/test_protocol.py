"""Protocol models: content parts, OpenAI names -> SamplingParams, ignored-field logging, error params."""

from __future__ import annotations

import logging

import pytest
from pydantic import ValidationError

from plm_serve.server.errors import APIError, param_from_loc
from plm_serve.server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    ImageURLPart,
    TextPart,
    VideoURLPart,
)

VOCAB = 128256


def chat(**fields) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "hi"}], **fields})


def test_content_parts_parse_by_type():
    req = ChatCompletionRequest.model_validate(
        {
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "what is this?"},
                        {"type": "image_url", "image_url": {"url": "data:x", "detail": "low"}},
                        {"type": "image_url", "image_url": "https://example.com/a.png"},  # bare string form
                        {
                            "type": "video_url",
                            "video_url": {"url": "https://example.com/v.mp4", "num_frames": 8},
                        },
                    ],
                }
            ]
        }
    )
    parts = req.messages[0].content
    assert [type(p) for p in parts] == [TextPart, ImageURLPart, ImageURLPart, VideoURLPart]
    assert parts[1].image_url.detail == "low" and parts[2].image_url.detail == "auto"
    assert parts[2].image_url.url == "https://example.com/a.png"
    assert parts[3].video_url.num_frames == 8


@pytest.mark.parametrize(
    "part",
    [
        {"type": "input_audio", "input_audio": {"data": "x", "format": "wav"}},
        {"type": "image_url", "image_url": {"url": "x", "detail": "ultra"}},
        {"type": "video_url", "video_url": {"url": "x", "num_frames": 0}},
    ],
)
def test_bad_content_parts_are_validation_errors(part):
    with pytest.raises(ValidationError):
        ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": [part]}]})


def test_unset_temperature_is_greedy_and_max_tokens_unbounded():
    params = chat().to_sampling_params(VOCAB)
    assert params.temperature == 0.0 and params.greedy
    assert params.max_tokens is None
    assert params.n == 1 and params.logprobs is None and params.skip_special_tokens


def test_openai_names_map_onto_sampling_params():
    params = chat(
        temperature=0.7,
        top_p=0.9,
        max_tokens=50,
        max_completion_tokens=20,  # supersedes max_tokens
        stop="END",
        seed=7,
        n=3,
        logprobs=True,
        top_logprobs=4,
        logit_bias={"128009": -100, "42": 2.5},
        presence_penalty=0.5,
        frequency_penalty=-0.5,
        top_k=-1,
        min_p=0.05,
        repetition_penalty=1.1,
        min_tokens=2,
        ignore_eos=True,
        stop_token_ids=[128001],
        skip_special_tokens=False,
    ).to_sampling_params(VOCAB)
    assert (params.temperature, params.top_p, params.max_tokens, params.seed, params.n) == (
        0.7,
        0.9,
        20,
        7,
        3,
    )
    assert params.stop == ["END"] and params.stop_token_ids == [128001]
    assert params.logprobs == 4 and params.logit_bias == {128009: -100.0, 42: 2.5}
    assert (params.presence_penalty, params.frequency_penalty) == (0.5, -0.5)
    assert (params.top_k, params.min_p, params.repetition_penalty, params.min_tokens) == (0, 0.05, 1.1, 2)
    assert params.ignore_eos and not params.skip_special_tokens


def test_top_p_zero_means_greedy():
    params = chat(temperature=1.0, top_p=0.0).to_sampling_params(VOCAB)
    assert params.temperature == 0.0 and params.top_p == 1.0


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"logit_bias": {"abc": 1}}, "logit_bias"),
        ({"logit_bias": {"5": 101}}, "logit_bias"),
        ({"logit_bias": {str(VOCAB): 1}}, "logit_bias"),
        ({"stop_token_ids": [VOCAB]}, "stop_token_ids"),
        ({"top_k": VOCAB + 1}, "top_k"),
        ({"top_logprobs": 3}, "top_logprobs"),  # without logprobs=true
        ({"max_tokens": 2, "min_tokens": 5}, "min_tokens"),
    ],
)
def test_invalid_combinations_raise_400_with_param(fields, param):
    with pytest.raises(APIError) as info:
        chat(**fields).to_sampling_params(VOCAB)
    assert info.value.status_code == 400 and info.value.param == param


@pytest.mark.parametrize(
    ("fields", "loc"),
    [
        ({"stop": ["ok", ""]}, ("stop", "list[constrained-str]", 1)),
        ({"stop": "x" * 1025}, ("stop", "constrained-str")),
        ({"max_tokens": "4"}, ("max_tokens",)),  # no lax coercion
        ({"n": True}, ("n",)),
        ({"temperature": float("inf")}, ("temperature",)),
        ({"seed": 2**63}, ("seed",)),
        ({"top_k": 2**31}, ("top_k",)),
        ({"stop_token_ids": [-1]}, ("stop_token_ids", 0)),
    ],
)
def test_strict_bounded_fields_are_validation_errors(fields, loc):
    with pytest.raises(ValidationError) as info:
        chat(**fields)
    assert any(e["loc"][: len(loc)] == loc for e in info.value.errors()), info.value.errors()


def test_unknown_fields_are_accepted_and_logged(caplog):
    with caplog.at_level(logging.WARNING, logger="plm_serve.server.protocol"):
        req = chat(store=True, metadata={"a": "b"})
    assert req.model_extra == {"store": True, "metadata": {"a": "b"}}
    assert "ignored" in caplog.text and "metadata" in caplog.text and "store" in caplog.text


def test_completion_prompt_forms():
    assert CompletionRequest(prompt="a").prompts() == ["a"]
    assert CompletionRequest(prompt=["a", "b"]).prompts() == ["a", "b"]
    assert CompletionRequest(prompt=[1, 2, 3]).prompts() == [[1, 2, 3]]
    assert CompletionRequest(prompt=[[1], [2, 3]]).prompts() == [[1], [2, 3]]
    assert CompletionRequest(prompt="a").to_sampling_params(VOCAB).max_tokens is None
    assert CompletionRequest(prompt="a", logprobs=2).to_sampling_params(VOCAB).logprobs == 2
    CompletionRequest(prompt="a", echo=True, max_tokens=0).check_supported()  # scoring only
    for fields in ({"max_tokens": 0}, {"suffix": "x"}, {"best_of": 3}):
        with pytest.raises(APIError):
            CompletionRequest(prompt="a", **fields).check_supported()


def test_param_from_loc_uses_openai_spelling():
    assert param_from_loc(("body", "messages", 0, "content", 1, "image_url", "url")) == (
        "messages[0].content[1].image_url.url"
    )
    assert param_from_loc(("body", "temperature")) == "temperature"
    assert param_from_loc(("body",)) is None
    union = ("body", "messages", 0, "content", "list[tagged-union[TextPart,ImageURLPart]]", 0, "image_url")
    assert param_from_loc((*union, "image_url", "detail")) == "messages[0].content[0].image_url.detail"
    assert param_from_loc(("body", "prompt", "list[int]", 0)) == "prompt[0]"
