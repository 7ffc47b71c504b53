"""Tools in the prompt: the Llama 3.1 JSON convention through PLM's template, and native tool templates."""

from __future__ import annotations

import json

import pytest

from plm_serve.processors import ImageInput, InvalidContentError, Processor
from plm_serve.processors.tool_prompt import TOOL_INSTRUCTION
from tests.processors import media

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather of a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
DEFAULT_SYSTEM = (
    "You are a helpful language and vision assistant. You are able to understand the visual content that the "
    "user provides, and assist the user with a variety of tasks using natural language."
)


def header(role: str) -> str:
    return f"<|start_header_id|>{role}<|end_header_id|>\n\n"


def rendered(processor: Processor, messages, tools=None) -> str:
    return processor.decode(
        processor.process_chat(messages, tools=tools).token_ids, skip_special_tokens=False
    )


def test_a_tool_conversation_renders_in_the_llama31_json_convention(processor):
    messages = [
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": '{"celsius": 21}'},
    ]
    tools_block = TOOL_INSTRUCTION + json.dumps(WEATHER, indent=4) + "\n\n"
    expected = (
        "<|begin_of_text|>"
        + header("system")
        + DEFAULT_SYSTEM
        + "<|eot_id|>"
        + header("user")
        + tools_block
        + "Weather in Paris?<|eot_id|>"
        + header("assistant")
        + '{"name": "get_weather", "parameters": {"city": "Paris"}}<|eot_id|>'
        + header("ipython")
        + '{"celsius": 21}<|eot_id|>'
        + header("assistant")
    )
    assert rendered(processor, messages, [WEATHER]) == expected


def test_without_tools_the_prompt_is_unchanged_and_parallel_calls_join_with_a_semicolon(processor):
    plain = [{"role": "user", "content": "Hi"}]
    assert processor.process_chat(plain, tools=None).token_ids == processor.process_chat(plain).token_ids
    call = lambda city: {"type": "function", "function": {"name": "get_weather", "arguments": {"city": city}}}
    history = [*plain, {"role": "assistant", "content": "", "tool_calls": [call("Paris"), call("Rome")]}]
    text = rendered(processor, history)
    assert (
        '{"name": "get_weather", "parameters": {"city": "Paris"}}; '
        '{"name": "get_weather", "parameters": {"city": "Rome"}}<|eot_id|>'
    ) in text


def test_tools_share_the_first_text_part_and_media_keep_their_place(processor):
    image = ImageInput(media.png(64, 64, seed=1), detail="low")
    messages = [{"role": "user", "content": [image, {"type": "text", "text": "What city is this?"}]}]
    text = rendered(processor, messages, [WEATHER])
    assert header("user") + "<|image|>" in text  # placeholders first, as PLM's template puts them
    assert text.count("<|image|>") == 256 and "}\n\nWhat city is this?<|eot_id|>" in text


@pytest.mark.parametrize(
    ("message", "param"),
    [
        (
            {"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "not json"}}]},
            "messages[1].tool_calls[0].function.arguments",
        ),
        (
            {"role": "assistant", "tool_calls": [{"function": {"arguments": "{}"}}]},
            "messages[1].tool_calls[0].function.name",
        ),
        ({"role": "tool", "content": [ImageInput(b"x")]}, "messages[1].content"),
    ],
)
def test_malformed_tool_history_points_at_the_field(processor, message, param):
    with pytest.raises(InvalidContentError) as err:
        processor.process_chat([{"role": "user", "content": "Hi"}, message])
    assert err.value.param == param


def test_tools_without_a_user_message_are_refused(processor):
    with pytest.raises(InvalidContentError, match="user message"):
        processor.process_chat([{"role": "system", "content": "Only a system prompt."}], tools=[WEATHER])


def test_a_template_that_reads_tools_renders_them_itself(ckpt_l):
    template = (
        "{% for t in tools or [] %}TOOL:{{ t.function.name }}\n{% endfor %}"
        "{% for m in messages %}{{ m.role }}:{% for p in m.content %}{{ p.text }}{% endfor %}"
        "{% for c in m.tool_calls or [] %}CALL:{{ c.function.name }}({{ c.function.arguments.city }}){% endfor %}{{ '\\n' }}"
        "{% endfor %}"
    )
    processor = Processor.from_pretrained(ckpt_l, chat_template=template)
    assert processor.template.renders_tools
    messages = [
        {"role": "user", "content": "Weather?"},
        {
            "role": "assistant",
            "tool_calls": [{"function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}],
        },
        {"role": "tool", "content": "cold"},
    ]
    assert rendered(processor, messages, [WEATHER]) == (
        "TOOL:get_weather\nuser:Weather?\nassistant:CALL:get_weather(Oslo)\ntool:cold\n"
    )
