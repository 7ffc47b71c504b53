"""Chat prompts: token ids identical to transformers' `apply_chat_template(tokenize=True)` + processor."""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from plm_serve.processors import ImageInput, PromptTooLongError, VideoInput
from tests.processors import media

IMG_A = media.jpeg(640, 480, seed=1)
IMG_B = media.png(300, 900, seed=2)
IMG_C = media.jpeg(33, 47, seed=3)
VID = media.video(8, 96, 64)
SYSTEM = "You are a terse assistant. Answer in one word."


def T(text: str) -> dict[str, str]:
    return {"type": "text", "text": text}


# (name, messages); for transformers, media parts become PIL images / decoded frame arrays (`_to_hf`).
CONVERSATIONS: list[tuple[str, list[dict[str, Any]]]] = [
    ("text only", [{"role": "user", "content": [T("Hello!")]}]),
    ("default system + image", [{"role": "user", "content": [ImageInput(IMG_A), T("Describe the image.")]}]),
    ("system prompt", [{"role": "system", "content": SYSTEM}, {"role": "user", "content": [T("Hi")]}]),
    (
        "system + image",
        [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": [ImageInput(IMG_B), T("What is it?")]},
        ],
    ),
    ("two images", [{"role": "user", "content": [ImageInput(IMG_A), ImageInput(IMG_B), T("Compare them.")]}]),
    (
        "three images, text first",
        [{"role": "user", "content": [T("Look:"), ImageInput(IMG_C), ImageInput(IMG_A)]}],
    ),
    ("tiny image", [{"role": "user", "content": [ImageInput(IMG_C)]}]),
    ("video", [{"role": "user", "content": [VideoInput(VID), T("What happens?")]}]),
    ("image + video", [{"role": "user", "content": [VideoInput(VID), ImageInput(IMG_C), T("Relate them.")]}]),
    (
        "multi-turn",
        [
            {"role": "user", "content": [ImageInput(IMG_A), T("What is this?")]},
            {"role": "assistant", "content": [T("A gradient.")]},
            {"role": "user", "content": [T("Which colours?")]},
        ],
    ),
    (
        "multi-turn, images in two turns",
        [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": [ImageInput(IMG_A), T("First?")]},
            {"role": "assistant", "content": [T("Yes.")]},
            {"role": "user", "content": [ImageInput(IMG_B), T("Second?")]},
        ],
    ),
    (
        "unicode",
        [{"role": "user", "content": [T("Ünïcödé ✓ — 日本語のテキスト, 한국어, العربية, emoji 🤖🎉")]}],
    ),
    ("code", [{"role": "user", "content": [T("def f(x):\n    return x ** 2  # square\n\n\tprint(f(3))")]}]),
    ("whitespace is trimmed", [{"role": "user", "content": [T("   padded text \n\n")]}]),
    ("empty text", [{"role": "user", "content": [T("")]}]),
    ("image and empty text", [{"role": "user", "content": [ImageInput(IMG_C), T("")]}]),
    ("several text parts", [{"role": "user", "content": [T("one"), T(" two "), T("three")]}]),
    ("numbers", [{"role": "user", "content": [T("1234567890 3.14159 -42 1e-9 0xFF")]}]),
    (
        "assistant last, no generation prompt",
        [
            {"role": "user", "content": [T("Hi")]},
            {"role": "assistant", "content": [T("Hello, how can I help?")]},
        ],
    ),
    (
        "special characters",
        [{"role": "user", "content": [T("<b>bold</b> & \"quotes\" 'single' \\ back`tick`")]}],
    ),
    ("long text", [{"role": "user", "content": [T("The quick brown fox jumps over the lazy dog. " * 40)]}]),
    ("only image", [{"role": "user", "content": [ImageInput(IMG_B)]}]),
]


def _to_hf(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for message in messages:
        content = message["content"]
        if isinstance(content, list):
            parts = []
            for part in content:
                if isinstance(part, ImageInput):
                    parts.append({"type": "image", "image": Image.open(io.BytesIO(part.data))})
                elif isinstance(part, VideoInput):
                    parts.append({"type": "video", "video": media.decode_all_frames(part.data)})
                else:
                    parts.append(part)
            content = parts
        out.append({"role": message["role"], "content": content})
    return out


def _reference(hf_processor, messages, add_generation_prompt: bool = True):
    return hf_processor.apply_chat_template(
        _to_hf(messages), add_generation_prompt=add_generation_prompt, tokenize=True, return_dict=True
    )


@pytest.mark.parametrize(("name", "messages"), CONVERSATIONS, ids=[c[0] for c in CONVERSATIONS])
def test_token_ids_match_reference(processor, hf_processor, name: str, messages) -> None:
    add_generation_prompt = "no generation prompt" not in name
    ours = processor.process_chat(messages, add_generation_prompt=add_generation_prompt)
    theirs = _reference(hf_processor, messages, add_generation_prompt)
    assert ours.token_ids == theirs["input_ids"][0]
    assert ours.token_ids.count(processor.bos_token_id) == 1
    # placeholder runs: in order, contiguous, each of its item's length, nothing else uses the ids
    placeholder_ids = {processor.image_token_id, processor.video_token_id}
    assert sum(t in placeholder_ids for t in ours.token_ids) == ours.num_media_tokens
    offsets = [m.offset for m in ours.media]
    assert offsets == sorted(offsets)
    for m in ours.media:
        token = processor.image_token_id if m.kind == "image" else processor.video_token_id
        assert ours.token_ids[m.offset : m.offset + m.length] == [token] * m.length
        assert m.length == m.num_tiles * 256 and m.pixels.shape == (m.num_tiles, 3, 448, 448)
        assert m.pixels.dtype == torch.uint8


def test_pixels_match_reference_in_placeholder_order(processor, hf_processor) -> None:
    messages = dict(CONVERSATIONS)["multi-turn, images in two turns"]
    ours = processor.process_chat(messages)
    theirs = _reference(hf_processor, messages)
    assert len(ours.media) == len(theirs["pixel_values"]) == 2
    for m, expected in zip(ours.media, theirs["pixel_values"], strict=True):
        assert torch.equal((m.pixels.float() - 127.5) / 127.5, expected)


def test_string_content_is_one_text_part(processor, hf_processor) -> None:
    """Deviation: the reference template drops string content silently; we render it as one text part."""
    ours = processor.process_chat([{"role": "user", "content": "What is 2+2?"}])
    as_parts = _reference(hf_processor, [{"role": "user", "content": [T("What is 2+2?")]}])
    assert ours.token_ids == as_parts["input_ids"][0]
    dropped = _reference(hf_processor, [{"role": "user", "content": "What is 2+2?"}])
    assert len(dropped["input_ids"][0]) < len(ours.token_ids)


def test_system_text_parts_and_developer_role(processor, hf_processor) -> None:
    expected = _reference(
        hf_processor,
        [{"role": "system", "content": "Be brief.\nBe kind."}, {"role": "user", "content": [T("Hi")]}],
    )
    for role in ("system", "developer"):
        messages = [
            {"role": role, "content": [T("Be brief."), T("Be kind.")]},
            {"role": "user", "content": "Hi"},
        ]
        assert processor.process_chat(messages).token_ids == expected["input_ids"][0]


def test_detail_low_is_one_tile(processor, ckpt_l) -> None:
    from tests import reference

    hf = reference.build_hf_processor(max_num_tiles=4, vision_input_type="vanilla")
    messages = [
        {
            "role": "user",
            "content": [ImageInput(IMG_A, detail="low"), ImageInput(IMG_B, detail="low"), T("Hi")],
        }
    ]
    ours = processor.process_chat(messages)
    theirs = _reference(hf, messages)
    assert ours.token_ids == theirs["input_ids"][0]
    assert [m.num_tiles for m in ours.media] == [1, 1]
    for m, expected in zip(ours.media, theirs["pixel_values"], strict=True):
        assert torch.equal((m.pixels.float() - 127.5) / 127.5, expected)


def test_process_prompt_matches_tokenizer(processor, hf_processor) -> None:
    for text in ["Hello world", "", "  leading spaces", "Ünïcödé 🤖\n\nnew lines", "<|eot_id|> is special"]:
        ours = processor.process_prompt(text)
        assert ours.token_ids == hf_processor.tokenizer(text)["input_ids"]
        assert ours.media == []
    assert processor.process_prompt("Hello world").token_ids == [128000, 9906, 1917]


def test_decode(processor) -> None:
    ids = processor.process_prompt("Hello world, ünïcode ✓").token_ids
    assert processor.decode(ids) == "Hello world, ünïcode ✓"
    assert processor.decode(ids, skip_special_tokens=False).startswith("<|begin_of_text|>")
    assert processor.tokenizer.get_vocab_size() == 128256


def test_prompt_too_long_is_raised_before_any_pixel_work(processor, monkeypatch) -> None:
    import plm_serve.processors.processor as module

    def boom(*args, **kwargs):
        raise AssertionError("pixels must not be decoded for a rejected prompt")

    monkeypatch.setattr(module, "decode_image", boom)
    monkeypatch.setattr(module, "decode_frames", boom)
    messages = [{"role": "user", "content": [ImageInput(IMG_A), VideoInput(VID), T("Describe.")]}]
    with pytest.raises(PromptTooLongError) as info:
        processor.process_chat(messages, max_prompt_tokens=1000)
    err = info.value
    assert err.limit == 1000 and err.num_tokens > 1000 and err.param == "messages"
    text = str(err)
    assert "messages[0].content[0]: 1280 tokens (5 tiles)" in text
    assert "messages[0].content[1]: 2048 tokens (8 frames)" in text
    assert 'detail: "low"' in text


def test_prompt_limits(processor) -> None:
    messages = [{"role": "user", "content": [ImageInput(IMG_C), T("Hi")]}]
    n = len(processor.process_chat(messages).token_ids)
    assert len(processor.process_chat(messages, max_prompt_tokens=n).token_ids) == n
    with pytest.raises(PromptTooLongError):
        processor.process_chat(messages, max_prompt_tokens=n - 1)
    with pytest.raises(PromptTooLongError) as info:
        processor.process_prompt("word " * 50, max_prompt_tokens=10)
    assert info.value.param == "prompt" and info.value.limit == 10


def test_content_hash(processor) -> None:
    def media_of(*parts):
        return processor.process_chat([{"role": "user", "content": list(parts)}]).media

    a1, a2, b, low, few = media_of(
        ImageInput(IMG_A), ImageInput(IMG_A), ImageInput(IMG_B), ImageInput(IMG_A, detail="low"),
        ImageInput(IMG_A, max_num_tiles=2),
    )  # fmt: skip
    assert a1.content_hash == a2.content_hash
    assert len({a1.content_hash, b.content_hash, low.content_hash, few.content_hash}) == 4
    assert torch.equal(a1.pixels, a2.pixels)
    same_grid = media_of(ImageInput(IMG_A, max_num_tiles=4))[0]  # the checkpoint's own budget
    assert same_grid.content_hash == a1.content_hash
    v1, v2 = media_of(VideoInput(VID)), media_of(VideoInput(VID, num_frames=4))
    assert v1[0].content_hash != v2[0].content_hash


def test_media_is_not_shared_between_calls(processor) -> None:
    first = processor.process_chat([{"role": "user", "content": [ImageInput(IMG_C)]}]).media[0].pixels
    second = processor.process_chat([{"role": "user", "content": [ImageInput(IMG_C)]}]).media[0].pixels
    assert first.data_ptr() != second.data_ptr()
    assert np.array_equal(first.numpy(), second.numpy())
