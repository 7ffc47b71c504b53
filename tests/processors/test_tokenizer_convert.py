"""Our offline tiktoken -> tokenizers conversion against transformers' TikTokenConverter; the demo files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from plm_serve.processors import ImageInput, Processor, VideoInput, write_processor_files
from plm_serve.processors.tiktoken_convert import byte_alphabet, convert_llama3_tokenizer
from tests import reference
from tests.processors import media

CORPUS = [
    "Hello world",
    "",
    " ",
    "   leading and trailing   ",
    "\n\n\nnew\nlines\r\nand\ttabs\t\t",
    "Ünïcödé: naïve café, Straße, Ελληνικά, русский, עברית, العربية, हिन्दी, ไทย",
    "日本語のテキストと中文文本和한국어 텍스트",
    "emoji 🤖🎉👩‍👩‍👧‍👦 flags 🇫🇷🇯🇵 and ZWJ",
    "def main(argv: list[str]) -> int:\n    return sum(int(a) ** 2 for a in argv)  # squares\n",
    "for (int i = 0; i < n; ++i) { x[i] = y[i] * 2; }",
    "numbers 1234567890 3.14159 1e-10 -42 0xDEADBEEF 1,000,000",
    "I'm, you're, they've, we'll, he'd, it's, CAN'T, DON'T",
    "URL https://example.com/a/b?c=d&e=f#g and email a.b+c@example.org",
    "<|begin_of_text|><|eot_id|> special tokens inline <|image|> <|reserved_special_token_42|>",
    "control \x00\x01\x7f chars, nbsp\u00a0here, soft\u00adhyphen, zero\u200bwidth",
    "a" * 300 + " " + "ab" * 100,
    "   \n  \n\t  mixed   whitespace   \n",
    "’curly’ “quotes” — dashes – … ellipsis",
    'JSON {"key": [1, 2, {"nested": null}], "b": true}',
    "SELECT * FROM t WHERE x > 10 AND y LIKE '%z%';",
]


@pytest.fixture(scope="module")
def ours():
    return convert_llama3_tokenizer()


@pytest.fixture(scope="module")
def theirs():
    return reference.build_hf_tokenizer()


def test_byte_alphabet_is_a_printable_bijection() -> None:
    alphabet = byte_alphabet()
    assert len(set(alphabet)) == 256
    assert all(ch.isprintable() and not ch.isspace() for ch in alphabet)
    assert alphabet[ord("A")] == "A" and alphabet[ord(" ")] == "Ġ" and alphabet[ord("\n")] == "Ċ"


def test_same_ids_as_transformers_converter(ours, theirs) -> None:
    for text in CORPUS:
        assert (
            ours.encode(text, add_special_tokens=False).ids
            == theirs(text, add_special_tokens=False)["input_ids"]
        )
        assert ours.encode(text).ids == theirs(text)["input_ids"]  # BOS from the post-processor
        ids = ours.encode(text, add_special_tokens=False).ids
        assert ours.decode(ids, skip_special_tokens=False) == theirs.decode(ids, skip_special_tokens=False)


def test_same_tokenizer_json_as_transformers(ours, theirs) -> None:
    """Vocab, all 280k merges in order, pre-tokenizer, decoder, added tokens, post-processor: identical."""
    assert json.loads(ours.to_str()) == json.loads(theirs.backend_tokenizer.to_str())


def test_special_tokens(ours) -> None:
    assert ours.get_vocab_size() == 128256
    expected = {
        "<|begin_of_text|>": 128000, "<|end_of_text|>": 128001, "<|image|>": 128002, "<|video|>": 128003,
        "<|start_header_id|>": 128006, "<|end_header_id|>": 128007, "<|eot_id|>": 128009,
        "<|reserved_special_token_5|>": 128010, "<|reserved_special_token_250|>": 128255,
    }  # fmt: skip
    for token, token_id in expected.items():
        assert ours.token_to_id(token) == token_id


@pytest.fixture(scope="module")
def demo_folder(tmp_path_factory) -> Path:
    return write_processor_files(tmp_path_factory.mktemp("demo"), max_num_tiles=4)


def test_written_files_give_the_same_prompts(demo_folder: Path, processor) -> None:
    demo = Processor.from_pretrained(demo_folder)
    assert sorted(p.name for p in demo_folder.iterdir()) == [
        "chat_template.jinja", "processor_config.json", "tokenizer.json", "tokenizer_config.json",
    ]  # fmt: skip
    conversations = [
        [
            {
                "role": "user",
                "content": [ImageInput(media.jpeg(640, 480)), {"type": "text", "text": "Describe."}],
            }
        ],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Ünïcode ✓ 🤖"}],
        [{"role": "user", "content": [VideoInput(media.video(6, 64, 48)), {"type": "text", "text": "Hm?"}]}],
    ]
    for messages in conversations:
        a, b = demo.process_chat(messages), processor.process_chat(messages)
        assert a.token_ids == b.token_ids
        assert [m.content_hash for m in a.media] == [m.content_hash for m in b.media]
    assert demo.settings == processor.settings
    assert demo.process_prompt("Hello world").token_ids == [128000, 9906, 1917]


def test_written_files_load_in_transformers(demo_folder: Path, hf_processor) -> None:
    loaded = reference.load_hf_processor(demo_folder)
    assert loaded.image_processor.max_num_tiles == 4
    conv = [{"role": "user", "content": [{"type": "text", "text": "Hello there"}]}]
    kwargs = {"add_generation_prompt": True, "tokenize": True}
    assert loaded.apply_chat_template(conv, **kwargs) == hf_processor.apply_chat_template(conv, **kwargs)
