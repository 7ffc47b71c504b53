"""Tools, structured outputs and the Responses API over HTTP with the scripted FakeEngine: what reaches the
engine (prompt, grammar) and how scripted outputs are framed (tool-call deltas, Responses events)."""

from __future__ import annotations

import json

import pytest

from plm_serve.processors.tool_prompt import TOOL_INSTRUCTION
from plm_serve.server.config import ServerConfig
from tests.server.conftest import MODEL_NAME, chat_body
from tests.server.fake_engine import FakeEngine

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
CALL_PIECES = ['{"name": "get_weather", ', '"parameters": {"city": ', '"Paris"}}']


def scripted(pieces: list[str]) -> FakeEngine:
    return FakeEngine(script=pieces, script_ids=list(range(1000, 1000 + len(pieces))))


def sse_data(resp) -> list[str]:
    return [line[6:] for line in resp.text.splitlines() if line.startswith("data: ")]


def prompt_text(processor, fake: FakeEngine) -> str:
    return processor.decode(fake.submitted[-1].prompt_token_ids, skip_special_tokens=False)


def test_auto_tool_call_is_parsed_and_the_tools_are_in_the_prompt(make_client, processor):
    fake = scripted(CALL_PIECES)
    client = make_client(engine=fake)
    body = chat_body("Weather in Paris?", tools=[WEATHER_TOOL])
    choice = client.post("/v1/chat/completions", json=body).json()["choices"][0]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None
    (call,) = choice["message"]["tool_calls"]
    assert call["type"] == "function" and call["id"].startswith("call_")
    assert call["function"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'}
    assert TOOL_INSTRUCTION in prompt_text(processor, fake) and fake.compiled == []  # auto: no grammar


def test_streamed_tool_call_deltas_are_shaped_like_openai(make_client):
    client = make_client(engine=scripted(CALL_PIECES))
    resp = client.post("/v1/chat/completions", json=chat_body("Weather?", tools=[WEATHER_TOOL], stream=True))
    events = sse_data(resp)
    assert events[-1] == "[DONE]"
    deltas = [json.loads(e)["choices"][0] for e in events[:-1]]
    assert deltas[0]["delta"] == {"role": "assistant", "content": ""}
    calls = [d["delta"]["tool_calls"][0] for d in deltas if "tool_calls" in d["delta"]]
    assert calls[0] == {
        "index": 0,
        "id": calls[0]["id"],
        "type": "function",
        "function": {"name": "get_weather", "arguments": ""},
    }
    assert all(c.keys() == {"index", "function"} for c in calls[1:])
    assert "".join(c["function"]["arguments"] for c in calls) == '{"city": "Paris"}'
    assert deltas[-1] == {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "tool_calls"}


def test_tool_choice_none_keeps_tools_out_of_the_prompt_and_output_is_content(make_client, processor):
    fake = scripted(CALL_PIECES)
    client = make_client(engine=fake)
    body = chat_body("Weather?", tools=[WEATHER_TOOL], tool_choice="none")
    choice = client.post("/v1/chat/completions", json=body).json()["choices"][0]
    assert choice["message"]["content"] == "".join(CALL_PIECES) and "tool_calls" not in choice["message"]
    assert choice["finish_reason"] == "stop" and TOOL_INSTRUCTION not in prompt_text(processor, fake)


def test_required_and_response_format_reach_the_engine_as_grammars(make_client, fake):
    client = make_client()
    client.post("/v1/chat/completions", json=chat_body("x", tools=[WEATHER_TOOL], tool_choice="required"))
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    fmt = {"type": "json_schema", "json_schema": {"name": "a", "schema": schema, "strict": True}}
    client.post("/v1/chat/completions", json=chat_body("x", response_format=fmt))
    client.post("/v1/completions", json={"prompt": "x", "max_tokens": 2, "guided_choice": ["a", "b"]})
    required, answer, choice = (r.sampling.structured_output for r in fake.submitted)
    assert required.kind == "grammar" and '"const": "get_weather"' in required.spec
    assert answer.kind == "json_schema" and json.loads(answer.spec) == schema
    assert choice.kind == "choice" and json.loads(choice.spec) == ["a", "b"]
    assert fake.compiled == [required, answer, choice]  # compiled before submission


MESSAGE_EVENTS = [
    "response.output_item.added",
    "response.content_part.added",
    "response.output_text.delta",
    "response.output_text.delta",
    "response.output_text.done",
    "response.content_part.done",
    "response.output_item.done",
]
CALL_EVENTS = [
    "response.output_item.added",
    *["response.function_call_arguments.delta"] * 2,  # the head completes with the second piece
    "response.function_call_arguments.done",
    "response.output_item.done",
]


@pytest.mark.parametrize(
    ("pieces", "events", "item"),
    [(["Hello", " there"], MESSAGE_EVENTS, "message"), (CALL_PIECES, CALL_EVENTS, "function_call")],
)
def test_responses_stream_event_order(make_client, pieces, events, item):
    client = make_client(engine=scripted(pieces))
    tool = {"type": "function", "name": "get_weather", "parameters": WEATHER_TOOL["function"]["parameters"]}
    body = {"model": MODEL_NAME, "input": "Hi", "tools": [tool], "stream": True}
    resp = client.post("/v1/responses", json=body)
    kinds = [line[7:] for line in resp.text.splitlines() if line.startswith("event: ")]
    payloads = [json.loads(d) for d in sse_data(resp)]
    assert [p["type"] for p in payloads] == kinds
    assert [p["sequence_number"] for p in payloads] == list(range(len(kinds)))
    assert kinds == ["response.created", "response.in_progress", *events, "response.completed"]
    assert "[DONE]" not in resp.text
    final = payloads[-1]["response"]
    (output,) = final["output"]
    assert output["type"] == item and output["status"] == "completed" and final["status"] == "completed"
    done = payloads[-2]["item"]
    assert done == output  # the item as completed equals the item in the final response


def test_tokenize_and_responses_errors(client):
    resp = client.post("/tokenize", json={"prompt": "a", "messages": [{"role": "user", "content": "b"}]})
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "prompt"
    resp = client.post(
        "/v1/responses",
        json={
            "model": MODEL_NAME,
            "input": [{"role": "user", "content": [{"type": "input_image", "file_id": "f"}]}],
        },
    )
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "input[0].content[0]"
    resp = client.post("/v1/responses", json={"model": MODEL_NAME, "input": "x", "tool_choice": "required"})
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "tool_choice"


def test_chat_template_override_is_a_file_or_inline_text(ckpt_l, tmp_path):
    inline = "{% for m in messages %}{{ m.role }}{% endfor %}"
    assert ServerConfig(model=str(ckpt_l), chat_template=inline).chat_template_source() == inline
    path = tmp_path / "template.jinja"
    path.write_text(inline)
    assert ServerConfig(model=str(ckpt_l), chat_template=str(path)).chat_template_source() == inline
    with pytest.raises(ValueError, match="neither a file nor a jinja template"):
        ServerConfig(model=str(ckpt_l), chat_template=str(tmp_path / "missing.jinja"))
