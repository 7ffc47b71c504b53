"""Tool calls read back from generated text: incremental, and the same result however the text is split."""

from __future__ import annotations

import json

import pytest

from plm_serve.engine import StructuredOutputParams
from plm_serve.server.errors import APIError
from plm_serve.server.tool_parser import ToolCallParser
from plm_serve.server.tools import Function, plan_tools

NAMES = {"get_weather", "noop"}
CALL = '{"name": "get_weather", "parameters": {"city": "Paris", "days": [1, 2]}}'


def run(text: str, pieces: int = 1, forced: bool = False, names=NAMES):
    """Feed `text` in chunks of `pieces` characters; returns (events, parser)."""
    parser = ToolCallParser(set(names), forced=forced)
    events = []
    for i in range(0, len(text), pieces):
        events += parser.feed(text[i : i + pieces])
    events += parser.finish()
    return events, parser


@pytest.mark.parametrize("pieces", [1, 3, 1000])
def test_a_call_is_announced_once_its_name_is_known_then_arguments_stream(pieces):
    events, parser = run(CALL, pieces)
    (call,) = parser.calls
    assert call.name == "get_weather" and call.id.startswith("call_")
    assert json.loads(call.arguments) == {"city": "Paris", "days": [1, 2]}
    assert events[0].call is call and events[0].index == 0
    assert "".join(e.arguments for e in events[1:]) == call.arguments == '{"city": "Paris", "days": [1, 2]}'
    assert parser.content == ""
    if pieces == 1:
        assert len(events) > 10  # streamed, not sent at the end


def test_announcement_comes_before_the_arguments_are_complete():
    parser = ToolCallParser(NAMES)
    head = '{"name": "get_weather", "parameters": {"ci'
    events = parser.feed(head)
    assert events[0].call.name == "get_weather" and events[1].arguments == '{"ci'


def test_parallel_calls_and_argument_strings_with_braces():
    text = '{"name": "noop", "parameters": {"s": "} ; {"}}; {"name": "get_weather", "arguments": "{\\"city\\": \\"Rome\\"}"}'
    for pieces in (1, 7, len(text)):
        _, parser = run(text, pieces)
        assert [c.name for c in parser.calls] == ["noop", "get_weather"]
        assert json.loads(parser.calls[0].arguments) == {"s": "} ; {"}
        assert json.loads(parser.calls[1].arguments) == {"city": "Rome"}  # a stringified object, decoded
        assert [e.index for e in _[1:] if e.call is not None] == [1]


def test_plain_text_is_content_and_streams_at_once():
    parser = ToolCallParser(NAMES)
    assert [e.content for e in parser.feed("  Hello")] == ["  Hello"]
    assert [e.content for e in parser.feed(" {there}")] == [" {there}"]
    assert parser.finish() == [] and not parser.called


@pytest.mark.parametrize(
    "text",
    [
        '{"answer": 42}',  # JSON that is not a call
        '{"name": "unknown_tool", "parameters": {}}',  # a function nobody offered
        '{"name": "get_weather", "param',  # cut off before it became a call
    ],
)
def test_json_that_is_not_a_call_is_content(text):
    events, parser = run(text, 2)
    assert not parser.calls and parser.content == text and "".join(e.content for e in events) == text


def test_other_key_orders_parse_at_the_end():
    events, parser = run('{"parameters": {"city": "Oslo"}, "name": "get_weather"}', 4)
    (call,) = parser.calls
    assert call.name == "get_weather" and json.loads(call.arguments) == {"city": "Oslo"}
    assert events[0].call is call and events[1].arguments == call.arguments


def test_text_after_the_calls_is_content():
    _, parser = run(CALL + " I hope that helps.", 5)
    assert len(parser.calls) == 1 and parser.content == " I hope that helps."


def test_a_call_cut_by_max_tokens_keeps_its_partial_arguments():
    _, parser = run('{"name": "get_weather", "parameters": {"city": "Par', 3, forced=True)
    (call,) = parser.calls
    assert call.arguments == '{"city": "Par' and parser.content == ""


# ------------------------------------------------------------------------------------------------ planning
WEATHER = Function("get_weather", "Weather.", {"type": "object", "properties": {"city": {"type": "string"}}})


@pytest.mark.parametrize(
    ("functions", "choice", "named", "message"),
    [
        ([WEATHER, WEATHER], None, None, "unique"),
        ([], "required", None, "needs tools"),
        ([WEATHER], "named", "other", "not among the tools"),
        ([Function("f", None, {"type": "array"})], None, None, "type object"),
    ],
)
def test_tool_plans_refuse_what_cannot_work(functions, choice, named, message):
    with pytest.raises(APIError, match=message):
        plan_tools(functions, choice, named, None, "tool_choice")


def test_tool_plans_modes_and_grammars():
    assert plan_tools([], None, None, None, "tool_choice").mode == "none"
    auto = plan_tools([WEATHER], None, None, None, "tool_choice")
    assert (
        auto.mode == "auto"
        and auto.grammar(None, "x") is None
        and auto.prompt_tools[0]["function"]["name"] == "get_weather"
    )
    assert auto.finish_reason("stop", called=True) == "tool_calls"
    named = plan_tools([WEATHER, Function("noop")], "named", "noop", False, "tool_choice")
    grammar = named.grammar(None, "x")
    assert (
        grammar.kind == "grammar" and '"const": "noop"' in grammar.spec and "get_weather" not in grammar.spec
    )
    assert grammar.spec.startswith("start: call\n")  # parallel_tool_calls false: one call
    assert named.finish_reason("stop", called=True) == "stop"
    answer = StructuredOutputParams("json_object")
    assert "start: answer | call" in auto.grammar(answer, "x").spec
    with pytest.raises(APIError):
        named.grammar(answer, "response_format")
    with pytest.raises(APIError):
        auto.grammar(StructuredOutputParams("regex", "a"), "guided_regex")
    none = plan_tools([WEATHER], "none", None, None, "tool_choice")
    assert none.prompt_tools is None and none.parser() is None
