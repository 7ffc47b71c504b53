"""Structured outputs on the tiny random-weight checkpoint, where only the grammar can make the output valid."""

from __future__ import annotations

import json
import re

import pytest
import torch

from plm_serve.engine import FinishReason, StructuredOutputError, StructuredOutputParams
from plm_serve.engine import structured_output as so
from plm_serve.engine.sequence import Sequence
from tests.engine import engine_fixtures as fx
from tests.engine.test_engine_generation import make_core

WEATHER = {
    "type": "object",
    "properties": {
        "city": {"enum": ["Paris", "Rome", "Oslo"]},
        "celsius": {"type": "integer", "minimum": -50, "maximum": 50},
        "sunny": {"type": "boolean"},
        "summary": {"type": "string", "maxLength": 24},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 3},
    },
    "required": ["city", "celsius", "sunny", "summary", "tags"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def core(ckpt_l):
    return make_core(ckpt_l)


@pytest.fixture(scope="module")
def prompt(ckpt_l):
    processor = fx.reference.load_hf_processor(ckpt_l)
    return fx.build_prompt(processor, "text", "Give me the weather as JSON.")


def generate(
    core, prompt, structured: StructuredOutputParams, **sampling
) -> list[tuple[str, FinishReason, int]]:
    """(text, finish reason, output tokens) per choice."""
    core.add_request(fx.request(prompt, "so", structured_output=structured, **sampling))
    texts: dict[int, str] = {}
    results = {}
    while core.has_unfinished():
        for out in core.step():
            assert out.error is None
            texts[out.index] = texts.get(out.index, "") + out.text
            if out.finish_reason is not None:
                results[out.index] = (texts[out.index], out.finish_reason, out.num_output_tokens)
    core.scheduler.check_integrity()
    return [results[i] for i in sorted(results)]


def check_weather(value: dict) -> None:
    assert list(value) == ["city", "celsius", "sunny", "summary", "tags"]
    assert value["city"] in ("Paris", "Rome", "Oslo")
    assert isinstance(value["celsius"], int) and -50 <= value["celsius"] <= 50
    assert isinstance(value["sunny"], bool)
    assert isinstance(value["summary"], str) and len(value["summary"]) <= 24
    assert len(value["tags"]) <= 3 and all(isinstance(t, str) and len(t) <= 8 for t in value["tags"])


def test_json_schema_is_valid_compact_and_ends_the_sequence(core, prompt):
    schema = StructuredOutputParams("json_schema", json.dumps(WEATHER))
    choices = generate(core, prompt, schema, max_tokens=300, temperature=1.0, seed=7, n=4)
    choices += generate(core, prompt, schema, max_tokens=300)  # greedy
    for text, reason, num_tokens in choices:
        assert reason == FinishReason.STOP and num_tokens < 120, (text, num_tokens)
        value = json.loads(text)
        check_weather(value)
        # No free whitespace: the layout is json.dumps' default, byte for byte.
        assert text == json.dumps(value, ensure_ascii=False)


def test_json_object_regex_and_choice(core, prompt):
    for text, reason, _ in generate(
        core, prompt, StructuredOutputParams("json_object"), max_tokens=200, temperature=1.0, seed=1, n=2
    ):
        if reason == FinishReason.STOP:  # an object of random keys may also run into max_tokens
            assert isinstance(json.loads(text), dict)
        else:
            assert text.startswith("{")
    ((text, reason, _),) = generate(
        core, prompt, StructuredOutputParams("regex", r"[0-9]{3}-[a-z]{2,4}"), max_tokens=50
    )
    assert re.fullmatch(r"[0-9]{3}-[a-z]{2,4}", text) and reason == FinishReason.STOP
    choices = ["yes", "no", "maybe later"]
    spec = StructuredOutputParams("choice", json.dumps(choices))
    for text, reason, _ in generate(core, prompt, spec, max_tokens=20, temperature=1.0, seed=3, n=3):
        assert text in choices and reason == FinishReason.STOP


def test_lark_grammar_with_an_embedded_json_schema(core, prompt):
    schema = {"type": "object", "properties": {"x": {"type": "boolean"}}, "required": ["x"]}
    grammar = (
        f'start: "call " obj ("; call " obj)?\nobj: {so.lark_json({**schema, "additionalProperties": False})}'
    )
    ((text, reason, _),) = generate(core, prompt, StructuredOutputParams("grammar", grammar), max_tokens=60)
    assert re.fullmatch(r'call \{"x": (true|false)\}(; call \{"x": (true|false)\})?', text), text
    assert reason == FinishReason.STOP


@pytest.mark.parametrize(
    ("params", "message"),
    [
        (
            StructuredOutputParams(
                "json_schema", '{"type": "object", "properties": {"a": {"$ref": "#/nope"}}}'
            ),
            "nope",
        ),
        (StructuredOutputParams("json_schema", "{not json"), "JSON schema"),
        (StructuredOutputParams("regex", "a(b"), "unclosed group"),
        (StructuredOutputParams("choice", "[]"), "non-empty list"),
        (StructuredOutputParams("grammar", "start: undefined_rule"), "undefined_rule"),
    ],
)
def test_uncompilable_specs_are_rejected_with_the_reason(core, params, message):
    with pytest.raises(StructuredOutputError, match=message):
        core.grammars.compile(params)
    with pytest.raises(StructuredOutputError):  # also at submission, before anything is queued
        core.add_request(
            fx.request(fx.Prompt("p", [1, 2, 3], None, None, []), "bad", structured_output=params)
        )
    assert not core.has_unfinished()


def test_compiled_grammars_are_cached_and_matchers_are_independent(core):
    params = StructuredOutputParams("choice", '["ab", "cd"]')
    grammar = core.grammars.compile(params)
    assert core.grammars.compile(params) is grammar
    a, b = grammar.matcher(), grammar.matcher()
    token = core.tokenizer.encode("ab", add_special_tokens=False).ids[0]
    assert a.consume_token(token)
    assert b.validate_tokens([token]) == 1 and not b.is_stopped()


def test_the_bitmask_masks_exactly_the_constrained_rows(core):
    vocab = core.runner.vocab_size
    grammar = core.grammars.compile(StructuredOutputParams("regex", "[ab]"))
    seqs = [Sequence(i, "r", 0, [1], 1, fx.SamplingParams()) for i in range(3)]
    seqs[1].grammar = grammar.matcher()
    logits = torch.randn(3, vocab)
    before = logits.clone()
    mask = so.grammar_bitmask([seqs[1]], vocab, pin=False)  # the core's half: only the constrained row
    assert mask is not None and mask.seq_ids == [1] and mask.bits.shape == (1, (vocab + 31) // 32)
    so.apply_grammar_bitmask(logits, [s.seq_id for s in seqs], mask)  # the runner's half
    assert torch.equal(logits[0], before[0]) and torch.equal(logits[2], before[2])
    allowed = torch.isfinite(logits[1]).nonzero().squeeze(1).tolist()
    assert {core.tokenizer.decode([t]) for t in allowed} == {"a", "b"}
    assert torch.equal(logits[1, allowed], before[1, allowed])


def test_unpack_bitmask_matches_bit_order():
    words = torch.tensor([[0b101 - (1 << 31), -1], [0, -(1 << 31)]], dtype=torch.int32)  # -(1 << 31): bit 31
    allowed = so.unpack_bitmask(words, 40)
    assert allowed.shape == (2, 40)
    assert allowed[0].nonzero().squeeze(1).tolist() == [0, 2, 31, *range(32, 40)]
    assert allowed[1].nonzero().squeeze(1).tolist() == []  # bit 31 of word 1 is token 63, beyond 40
    random = torch.randint(-(2**31), 2**31 - 1, (3, 9), dtype=torch.int32)
    as_bytes = random.view(torch.uint8)
    expected = ((random.unsqueeze(-1) >> torch.arange(32, dtype=torch.int32)) & 1).flatten(1).bool()
    assert torch.equal(so.unpack_bitmask(random, 288), expected)  # numpy, the CPU path
    assert torch.equal(so.unpack_with_shifts(as_bytes).bool(), expected)  # shifts, the GPU path


def test_missing_library_is_a_clear_rejection(core, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_llguidance(name, *args, **kwargs):
        if name == "llguidance":
            raise ImportError("No module named 'llguidance'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_llguidance)
    assert not so.is_available()
    with pytest.raises(so.StructuredOutputUnavailable, match="pip install llguidance"):
        core.grammars.compile(StructuredOutputParams("regex", "never-compiled-before"))
