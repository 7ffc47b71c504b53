"""The OpenAI surface beyond plain chat, end to end with the official `openai` client against a live server on the
tiny random-weight checkpoint: structured outputs (only the grammar can make its JSON valid), tool calls, prompt
scoring as lm-evaluation-harness requests it, the Responses API, and the small routes."""

from __future__ import annotations

import json
from typing import Literal

import httpx
import openai
import pytest
from pydantic import BaseModel, Field

from tests.server import media, test_live

MODEL = test_live.MODEL
live = test_live.live  # the live server fixture (module-scoped: one server for this file)


class Weather(BaseModel):
    city: Literal["Paris", "Rome", "Oslo"]
    celsius: int = Field(ge=-50, le=50)
    sunny: bool
    summary: str = Field(max_length=24)


class GetWeather(BaseModel):
    """Current weather of a city."""

    city: Literal["Paris", "Rome", "Oslo"]
    unit: Literal["celsius", "fahrenheit"]


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


# ------------------------------------------------------------------------------------------ structured outputs
def test_parse_with_a_pydantic_model_gives_a_valid_instance(live):
    client = live.client()
    for seed in (1, 2):
        completion = client.chat.completions.parse(
            model=MODEL,
            messages=user("What is the weather in Rome?"),
            response_format=Weather,
            max_tokens=200,
            temperature=1.0,
            seed=seed,
        )
        choice = completion.choices[0]
        assert choice.finish_reason == "stop" and isinstance(choice.message.parsed, Weather)
        assert completion.usage.completion_tokens < 80  # no free whitespace: the JSON ends by itself


def test_streamed_json_object_and_guided_choice(live):
    client = live.client()
    stream = client.chat.completions.create(
        model=MODEL,
        messages=user("Answer yes or no."),
        max_tokens=20,
        stream=True,
        extra_body={"structured_outputs": {"choice": ["yes", "no"]}},
    )
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text in ("yes", "no")
    resp = client.chat.completions.create(
        model=MODEL, messages=user("Give me digits."), max_tokens=20, extra_body={"guided_regex": "[0-9]{4}"}
    )
    assert len(resp.choices[0].message.content) == 4 and resp.choices[0].message.content.isdigit()


def test_an_uncompilable_schema_is_a_400_naming_the_problem(live):
    bad = {"type": "object", "properties": {"a": {"$ref": "#/definitions/missing"}}}
    with pytest.raises(openai.BadRequestError) as err:
        live.client().chat.completions.create(
            model=MODEL,
            messages=user("x"),
            response_format={"type": "json_schema", "json_schema": {"name": "bad", "schema": bad}},
        )
    assert err.value.body["param"] == "response_format.json_schema.schema"
    assert "missing" in err.value.body["message"]


# ------------------------------------------------------------------------------------------------ tool calls
def test_required_tool_call_with_the_pydantic_tool_helper(live):
    client = live.client()
    completion = client.chat.completions.parse(
        model=MODEL,
        messages=user("Weather in Oslo, in celsius?"),
        tools=[openai.pydantic_function_tool(GetWeather)],
        tool_choice="required",
        parallel_tool_calls=False,
        max_tokens=100,
    )
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls"
    (call,) = choice.message.tool_calls
    assert call.id.startswith("call_") and call.function.name == "GetWeather"
    assert isinstance(call.function.parsed_arguments, GetWeather)

    # The call and its result go back into the history; the next turn is rendered with them.
    follow_up = client.chat.completions.create(
        model=MODEL,
        messages=[
            *user("Weather in Oslo, in celsius?"),
            choice.message.model_dump(exclude_none=True, exclude={"parsed"}),
            {"role": "tool", "tool_call_id": call.id, "content": '{"celsius": -3}'},
        ],
        tools=[openai.pydantic_function_tool(GetWeather)],
        tool_choice="none",
        max_tokens=5,
    )
    assert follow_up.choices[0].message.tool_calls is None


def test_named_tool_call_streams_name_first_then_argument_deltas(live):
    tools = [
        openai.pydantic_function_tool(GetWeather),
        {
            "type": "function",
            "function": {"name": "noop", "parameters": {"type": "object", "properties": {}}},
        },
    ]
    stream = live.client().chat.completions.create(
        model=MODEL,
        messages=user("Weather in Paris?"),
        tools=tools,
        tool_choice={"type": "function", "function": {"name": "GetWeather"}},
        max_tokens=100,
        stream=True,
    )
    deltas = [c.choices[0] for c in stream if c.choices]
    calls = [tc for d in deltas for tc in (d.delta.tool_calls or [])]
    first, rest = calls[0], calls[1:]
    assert first.index == 0 and first.id.startswith("call_") and first.function.name == "GetWeather"
    assert rest and all(tc.id is None and tc.function.name is None for tc in rest)
    arguments = "".join(tc.function.arguments or "" for tc in calls)
    GetWeather.model_validate_json(arguments)
    assert deltas[-1].finish_reason == "stop"  # a forced function: OpenAI reports "stop"


# -------------------------------------------------------------------------------------------- prompt scoring
def test_lm_eval_harness_loglikelihood_request(live):
    """The request lm-evaluation-harness' local-completions model sends, read as its parse_logprobs reads it."""
    tokenizer = live.processor.tokenizer
    context = tokenizer.encode("The capital of France is", add_special_tokens=True).ids
    continuation = tokenizer.encode(" Paris", add_special_tokens=False).ids
    body = {
        "model": MODEL,
        "prompt": [context + continuation],
        "temperature": 0,
        "max_tokens": 1,
        "logprobs": 1,
        "seed": 1234,
        "echo": True,
    }
    out = httpx.post(f"{live.base_url}/v1/completions", json=body, timeout=60).json()
    (choice,) = out["choices"]
    logprobs = choice["logprobs"]
    ctxlen = len(context)
    assert len(logprobs["token_logprobs"]) == ctxlen + len(continuation) + 1  # prompt + the one generated
    assert logprobs["token_logprobs"][0] is None and logprobs["top_logprobs"][0] is None
    continuation_logprobs = logprobs["token_logprobs"][ctxlen:-1]
    top = logprobs["top_logprobs"][ctxlen:-1]
    assert all(isinstance(lp, float) and lp <= 0 for lp in continuation_logprobs)
    is_greedy = all(lp == max(t.values()) for lp, t in zip(continuation_logprobs, top, strict=True))
    # Its greedy verdict agrees with the model's own greedy continuation.
    greedy = live.client().completions.create(model=MODEL, prompt=[context], max_tokens=len(continuation))
    assert is_greedy == (
        tokenizer.encode(greedy.choices[0].text, add_special_tokens=False).ids == continuation
    )
    assert choice["text"].startswith(tokenizer.decode(context + continuation, skip_special_tokens=False))

    # Streamed, the echo (with the prompt's logprobs) comes first, then the generated token.
    streamed = httpx.post(f"{live.base_url}/v1/completions", json={**body, "stream": True}, timeout=60)
    chunks = [json.loads(line[6:]) for line in streamed.text.splitlines() if line.startswith("data: {")]
    parts = [c["choices"][0]["logprobs"] for c in chunks if c["choices"][0]["logprobs"]]
    assert [lp for p in parts for lp in p["token_logprobs"]] == logprobs["token_logprobs"]
    assert "".join(c["choices"][0]["text"] for c in chunks) == choice["text"]

    # max_tokens 0: the prompt only; vLLM's prompt_logprobs agree with the echoed ones.
    body.update(max_tokens=0, prompt_logprobs=2)
    scored = httpx.post(f"{live.base_url}/v1/completions", json=body, timeout=60).json()
    (only,) = scored["choices"]
    assert only["logprobs"]["token_logprobs"] == logprobs["token_logprobs"][:-1]
    assert scored["usage"]["completion_tokens"] == 0 and only["finish_reason"] == "length"
    prompt_logprobs = only["prompt_logprobs"]
    assert prompt_logprobs[0] is None and len(prompt_logprobs) == ctxlen + len(continuation)
    for token, entry, lp in zip(
        (context + continuation)[1:], prompt_logprobs[1:], logprobs["token_logprobs"][1:], strict=False
    ):
        assert entry[str(token)]["logprob"] == lp and entry[str(token)]["rank"] >= 1


def test_chat_prompt_logprobs(live):
    resp = httpx.post(
        f"{live.base_url}/v1/chat/completions",
        json={"model": MODEL, "messages": user("Hi"), "max_tokens": 1, "prompt_logprobs": 0},
        timeout=60,
    ).json()
    counted = httpx.post(f"{live.base_url}/tokenize", json={"model": MODEL, "messages": user("Hi")}).json()
    assert len(resp["prompt_logprobs"]) == counted["count"] == resp["usage"]["prompt_tokens"]
    assert resp["prompt_logprobs"][0] is None


# ------------------------------------------------------------------------------------------------- responses
def test_responses_create_with_instructions_and_an_image(live):
    client = live.client()
    response = client.responses.create(
        model=MODEL,
        instructions="Answer briefly.",
        input=[
            {
                "role": "user",
                "content": [
                    {
                        "type": "input_image",
                        "image_url": media.data_url(media.png(64, 64, seed=3)),
                        "detail": "low",
                    },
                    {"type": "input_text", "text": "What is this?"},
                ],
            }
        ],
        max_output_tokens=6,
    )
    assert response.object == "response" and response.status == "incomplete"
    assert response.incomplete_details.reason == "max_output_tokens"
    assert response.usage.output_tokens == 6 and response.usage.input_tokens > 256  # the image's 256 tokens
    assert isinstance(response.output_text, str)


def test_responses_stream_structured_output(live):
    client = live.client()
    with client.responses.stream(
        model=MODEL, input="The weather in Paris, please.", text_format=Weather, max_output_tokens=200
    ) as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_response()
    assert kinds[:2] == ["response.created", "response.in_progress"] and kinds[-1] == "response.completed"
    assert "response.output_text.delta" in kinds
    assert isinstance(final.output_parsed, Weather)


def test_responses_function_call_round_trip(live):
    client = live.client()
    tool = {
        "type": "function",
        "name": "get_weather",
        "parameters": GetWeather.model_json_schema(),
        "strict": False,
    }
    first = client.responses.create(
        model=MODEL, input="Weather in Rome?", tools=[tool], tool_choice="required", max_output_tokens=100
    )
    calls = [item for item in first.output if item.type == "function_call"]
    assert calls and all(c.name == "get_weather" for c in calls)
    GetWeather.model_validate_json(calls[0].arguments)
    with client.responses.stream(
        model=MODEL,
        input=[
            {"role": "user", "content": "Weather in Rome?"},
            *[
                {"type": "function_call", "call_id": c.call_id, "name": c.name, "arguments": c.arguments}
                for c in calls
            ],
            *[{"type": "function_call_output", "call_id": c.call_id, "output": "sunny"} for c in calls],
        ],
        tools=[tool],
        tool_choice={"type": "function", "name": "get_weather"},
        parallel_tool_calls=False,
        max_output_tokens=100,
    ) as stream:
        deltas = [e.delta for e in stream if e.type == "response.function_call_arguments.delta"]
        final = stream.get_final_response()
    (call,) = [item for item in final.output if item.type == "function_call"]
    assert "".join(deltas) == call.arguments
    GetWeather.model_validate_json(call.arguments)


def test_responses_refuse_previous_response_id(live):
    with pytest.raises(openai.BadRequestError) as err:
        live.client().responses.create(model=MODEL, input="x", previous_response_id="resp_123")
    assert err.value.body["param"] == "previous_response_id"


# ---------------------------------------------------------------------------------------------- small routes
def test_models_retrieve_tokenize_and_detokenize(live):
    client = live.client()
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4o")
    image = {
        "type": "image_url",
        "image_url": {"url": media.data_url(media.png(64, 64, seed=1)), "detail": "low"},
    }
    messages = [{"role": "user", "content": [image, {"type": "text", "text": "Hi"}]}]
    counted = httpx.post(f"{live.base_url}/tokenize", json={"model": MODEL, "messages": messages}).json()
    chat = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=1)
    assert counted["count"] == len(counted["tokens"]) == chat.usage.prompt_tokens
    assert counted["tokens"].count(128002) == 256 and counted["max_model_len"] == live.engine.max_model_len
    plain = httpx.post(
        f"{live.base_url}/tokenize", json={"prompt": "Hello world", "return_token_strs": True}
    ).json()
    assert plain["tokens"][0] == 128000 and plain["token_strs"][1:] == ["Hello", "Ġworld"]
    text = httpx.post(f"{live.base_url}/detokenize", json={"tokens": plain["tokens"]}).json()
    assert text == {"prompt": "<|begin_of_text|>Hello world"}
    bad = httpx.post(f"{live.base_url}/detokenize", json={"tokens": [10**9]})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"
    assert json.loads(httpx.post(f"{live.base_url}/tokenize", json={}).text)["error"]["param"] == "prompt"
