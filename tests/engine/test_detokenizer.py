"""IncrementalDetokenizer with the real PLM (Llama-3 byte-level BPE) tokenizer."""

from __future__ import annotations

import random

import pytest

from plm_serve.engine.detokenizer import IncrementalDetokenizer, TokenTexts
from tests.reference import build_hf_tokenizer

EOT = 128009
HEADER_END = 128007
TEXT = "Hi 😀 世界! 東京タワー 🤖 naïve café — 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ok"


@pytest.fixture(scope="module")
def tok():
    return build_hf_tokenizer().backend_tokenizer


def encode(tok, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False).ids


def prompt(tok) -> list[int]:
    return [128000, *encode(tok, "Say something"), HEADER_END, *encode(tok, "\n\n")]


def stream(detok: IncrementalDetokenizer, ids: list[int], sizes=None) -> list[str]:
    deltas, i, rng = [], 0, random.Random(0)
    while i < len(ids):
        n = rng.choice(sizes) if sizes else 1
        deltas.append(detok.add(ids[i : i + n]))
        i += n
    return deltas


def test_split_characters_are_held_until_complete(tok) -> None:
    ids = encode(tok, TEXT)
    assert any("\ufffd" in tok.decode([i]) for i in ids)  # the text really splits characters
    detok = IncrementalDetokenizer(tok, prompt(tok))
    deltas = stream(detok, ids)
    assert not any("\ufffd" in d for d in deltas)
    assert "".join(deltas) + detok.flush() == TEXT == detok.text


def test_robot_emoji_over_three_tokens(tok) -> None:
    ids = encode(tok, "a🤖b")
    assert len(ids) == 5
    detok = IncrementalDetokenizer(tok, prompt(tok))
    assert [detok.add([i]) for i in ids] == ["a", "", "", "🤖", "b"]


@pytest.mark.parametrize("sizes", [[1], [2, 3], [1, 4, 7]])
def test_any_chunking_gives_the_full_decode(tok, sizes) -> None:
    ids = encode(tok, TEXT * 3)
    detok = IncrementalDetokenizer(tok, prompt(tok))
    out = "".join(stream(detok, ids, sizes)) + detok.flush()
    assert out == tok.decode(ids)


def test_leading_space_of_the_first_token_is_kept(tok) -> None:
    detok = IncrementalDetokenizer(tok, prompt(tok))
    assert detok.add(encode(tok, " Hello")) == " Hello"


def test_window_stays_small(tok) -> None:
    detok = IncrementalDetokenizer(tok, prompt(tok))
    stream(detok, encode(tok, TEXT * 20))
    assert len(detok._ids) <= 8  # only recent tokens are decoded, not the whole output


def test_special_tokens_skipped_or_kept(tok) -> None:
    ids = [*encode(tok, "Done."), EOT]
    skip = IncrementalDetokenizer(tok, prompt(tok), skip_special_tokens=True)
    keep = IncrementalDetokenizer(tok, prompt(tok), skip_special_tokens=False)
    assert "".join(stream(skip, ids)) == "Done."
    assert "".join(stream(keep, ids)) == "Done.<|eot_id|>"


TALE = "The quick brown fox jumps over the lazy dog."


@pytest.mark.parametrize(
    ("stop", "expected"),
    [
        (["n fox ju"], "The quick brow"),  # spans three tokens
        (["row"], "The quick b"),  # inside one token: text after it in the token is dropped
        (["lazy", "fox"], "The quick brown "),  # the earliest match wins
        (["The"], ""),
        (["foxy"], TALE),  # " fox" is held back, then released
        (["dog.!"], TALE),  # held to the end, emitted by flush
    ],
)
def test_stop_strings(tok, stop, expected) -> None:
    for sizes in ([1], [2, 5]):
        detok = IncrementalDetokenizer(tok, prompt(tok), stop=stop)
        out = "".join(stream(detok, encode(tok, TALE), sizes)) + detok.flush()
        assert out == expected == detok.text
        assert detok.stopped == (expected != TALE)
        assert detok.add(encode(tok, " more")) == ("" if detok.stopped else " more")


def test_stop_prefix_is_held_back_not_emitted(tok) -> None:
    detok = IncrementalDetokenizer(tok, prompt(tok), stop=["fox!"])
    deltas = stream(detok, encode(tok, TALE))
    (with_fox,) = [d for d in deltas if "fox" in d]
    assert "jumps" in with_fox  # "fox" waited for the next token to rule out "fox!"
    assert "".join(deltas) + detok.flush() == TALE


def test_stop_string_across_a_split_character(tok) -> None:
    detok = IncrementalDetokenizer(tok, prompt(tok), stop=["🤖 n"])
    out = "".join(stream(detok, encode(tok, TEXT))) + detok.flush()
    assert out == "Hi 😀 世界! 東京タワー " and detok.stopped


def test_flush_renders_an_incomplete_character(tok) -> None:
    ids = encode(tok, "a🤖")
    detok = IncrementalDetokenizer(tok, prompt(tok))
    assert "".join(stream(detok, ids[:-1])) == "a"
    assert detok.flush() == "\ufffd"


def test_invalid_bytes_are_eventually_emitted(tok) -> None:
    ids = [*encode(tok, "ok "), *([encode(tok, "🤖")[1]] * 40), *encode(tok, " end")]
    detok = IncrementalDetokenizer(tok, prompt(tok))
    deltas = stream(detok, ids)
    assert "".join(deltas[:-4]).startswith("ok \ufffd")  # not held forever
    assert "".join(deltas) + detok.flush() == tok.decode(ids)


def test_token_texts(tok) -> None:
    texts = TokenTexts(tok)
    assert texts(encode(tok, " Hello")[0]) == " Hello"
    assert texts(EOT) == "<|eot_id|>"
    assert texts(encode(tok, "🤖")[0]) == "\ufffd"
