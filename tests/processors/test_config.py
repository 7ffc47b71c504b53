"""Checkpoint settings: both folder layouts, every honoured field, and clear errors for unsupported ones."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from plm_serve.processors import (
    CheckpointConfigError,
    ImageInput,
    InvalidContentError,
    MediaDecodeError,
    Processor,
    VideoInput,
)
from plm_serve.processors.config import ImageSettings, ProcessorSettings, VideoSettings
from tests.processors import media
from tests.processors.conftest import hf_image_processor


def _variant(src: Path, dst: Path, image: dict | None = None, video: dict | None = None, **files) -> Path:
    """A copy of the tiny checkpoint's processor files with settings changed (tokenizer.json is linked)."""
    dst.mkdir()
    (dst / "tokenizer.json").symlink_to(src / "tokenizer.json")
    for name in ("tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(src / name, dst / name)
    config = json.loads((src / "processor_config.json").read_text())
    config["image_processor"].update(image or {})
    config["video_processor"].update(video or {})
    (dst / "processor_config.json").write_text(json.dumps(config))
    for name, content in files.items():
        path = dst / name.replace("__", ".")
        if content is None:
            path.unlink()
        else:
            path.write_text(content if isinstance(content, str) else json.dumps(content))
    return dst


def test_settings_of_the_reference_checkpoint(processor) -> None:
    assert processor.settings == ProcessorSettings(
        image=ImageSettings(max_num_tiles=4), video=VideoSettings(), patch_size=14, pooling_ratio=2
    )
    assert processor.settings.tokens_per_tile == processor.settings.tokens_per_frame == 256


def test_transformers_4_layout(ckpt_l: Path, tmp_path: Path, processor) -> None:
    """4.5x: preprocessor_config.json + video_preprocessor_config.json + processor_config.json (patch/pool)."""
    config = json.loads((ckpt_l / "processor_config.json").read_text())
    folder = _variant(
        ckpt_l,
        tmp_path / "v4",
        preprocessor_config__json=config["image_processor"],
        video_preprocessor_config__json=config["video_processor"],
        processor_config__json={
            "patch_size": 14,
            "pooling_ratio": 2,
            "processor_class": "PerceptionLMProcessor",
        },
        special_tokens_map__json={"bos_token": {"content": "<|begin_of_text|>"}, "eos_token": "<|eot_id|>"},
    )
    old = Processor.from_pretrained(folder)
    assert old.settings == processor.settings
    messages = [
        {"role": "user", "content": [ImageInput(media.jpeg(300, 200)), {"type": "text", "text": "Hi"}]}
    ]
    assert old.process_chat(messages).token_ids == processor.process_chat(messages).token_ids


def test_bilinear_resample_is_honoured(ckpt_l: Path, tmp_path: Path) -> None:
    folder = _variant(ckpt_l, tmp_path / "bilinear", image={"resample": 2, "max_num_tiles": 2})
    data = media.jpeg(500, 300, seed=7)
    ours = Processor.from_pretrained(folder).process_chat([{"role": "user", "content": [ImageInput(data)]}])
    theirs = hf_image_processor(2, resample=2)(Image.open(io.BytesIO(data)), return_tensors=None)
    assert torch.equal((ours.media[0].pixels.float() - 127.5) / 127.5, theirs["pixel_values"][0])


def test_vanilla_mode_and_tile_size(ckpt_l: Path, tmp_path: Path) -> None:
    vanilla = Processor.from_pretrained(
        _variant(ckpt_l, tmp_path / "vanilla", image={"vision_input_type": "vanilla"})
    )
    assert vanilla.count_image_tokens(4000, 3000) == 256
    small = Processor.from_pretrained(_variant(ckpt_l, tmp_path / "t224", image={"tile_size": 224}))
    assert small.settings.tokens_per_tile == 64
    assert small.count_image_tokens(500, 450) == 5 * 64
    out = small.process_chat([{"role": "user", "content": [ImageInput(media.jpeg(500, 450))]}])
    assert out.media[0].pixels.shape == (5, 3, 224, 224)


def test_video_size_is_honoured(ckpt_l: Path, tmp_path: Path) -> None:
    from transformers import PerceptionLMVideoProcessor

    folder = _variant(ckpt_l, tmp_path / "v224", video={"size": {"height": 224, "width": 224}})
    ours = Processor.from_pretrained(folder)
    data = media.video(6, 96, 64)
    out = ours.process_chat([{"role": "user", "content": [VideoInput(data)]}])
    assert out.media[0].length == 6 * 64
    hf = PerceptionLMVideoProcessor(size={"height": 224, "width": 224})
    theirs = hf(videos=[media.decode_all_frames(data)], return_tensors=None)["pixel_values_videos"][0]
    assert torch.equal((out.media[0].pixels.float() - 127.5) / 127.5, theirs)


def test_checkpoint_frame_sampling_default(ckpt_l: Path, tmp_path: Path) -> None:
    folder = _variant(ckpt_l, tmp_path / "nf", video={"do_sample_frames": True, "num_frames": 5})
    out = Processor.from_pretrained(folder).process_chat(
        [{"role": "user", "content": [VideoInput(media.video(40))]}]
    )
    assert out.media[0].num_tiles == 5


def test_rgb_conversion_off(ckpt_l: Path, tmp_path: Path) -> None:
    strict = Processor.from_pretrained(_variant(ckpt_l, tmp_path / "norgb", image={"do_convert_rgb": False}))
    gray = media.encode(Image.new("L", (64, 64), 128), "PNG")
    with pytest.raises(MediaDecodeError, match="RGB"):
        strict.process_chat([{"role": "user", "content": [ImageInput(gray)]}])
    assert strict.process_chat([{"role": "user", "content": [ImageInput(media.jpeg(64, 64))]}]).media


@pytest.mark.parametrize(
    ("image", "match"),
    [
        ({"do_resize": False}, "do_resize"),
        ({"resample": 4}, "resample"),
        ({"max_num_tiles": 0}, "max_num_tiles"),
    ],
)
def test_unsupported_settings(ckpt_l: Path, tmp_path: Path, image: dict, match: str) -> None:
    with pytest.raises(CheckpointConfigError, match=match):
        Processor.from_pretrained(_variant(ckpt_l, tmp_path / "bad", image=image))


def test_missing_files(ckpt_l: Path, tmp_path: Path) -> None:
    with pytest.raises(CheckpointConfigError, match="image processor"):
        Processor.from_pretrained(_variant(ckpt_l, tmp_path / "a", processor_config__json={"patch_size": 14}))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointConfigError, match="image processor"):
        Processor.from_pretrained(empty)
    no_tokenizer = _variant(ckpt_l, tmp_path / "b")
    (no_tokenizer / "tokenizer.json").unlink()
    with pytest.raises(CheckpointConfigError, match=r"tokenizer\.json"):
        Processor.from_pretrained(no_tokenizer)


def test_chat_template_sources(ckpt_l: Path, tmp_path: Path, processor) -> None:
    template = (ckpt_l / "chat_template.jinja").read_text()
    messages = [{"role": "user", "content": "Hello"}]
    expected = processor.process_chat(messages).token_ids
    as_json = _variant(
        ckpt_l, tmp_path / "json", chat_template__jinja=None, chat_template__json={"chat_template": template}
    )
    tok_config = json.loads((ckpt_l / "tokenizer_config.json").read_text()) | {"chat_template": template}
    in_tokenizer = _variant(
        ckpt_l, tmp_path / "tok", chat_template__jinja=None, tokenizer_config__json=tok_config
    )
    fallback = _variant(ckpt_l, tmp_path / "none", chat_template__jinja=None)
    for folder in (as_json, in_tokenizer, fallback):
        assert Processor.from_pretrained(folder).process_chat(messages).token_ids == expected


def test_template_errors_are_content_errors(ckpt_l: Path, tmp_path: Path) -> None:
    strict = "{% if messages[0]['role'] != 'system' %}{{ raise_exception('a system message must come first') }}{% endif %}"
    folder = _variant(ckpt_l, tmp_path / "strict", chat_template__jinja=strict)
    with pytest.raises(InvalidContentError, match="a system message must come first"):
        Processor.from_pretrained(folder).process_chat([{"role": "user", "content": "Hi"}])
    escape = "{{ messages.__class__.__mro__ }}"
    folder = _variant(ckpt_l, tmp_path / "escape", chat_template__jinja=escape)
    with pytest.raises(InvalidContentError):
        Processor.from_pretrained(folder).process_chat([{"role": "user", "content": "Hi"}])
    broken = _variant(ckpt_l, tmp_path / "broken", chat_template__jinja="{% for %}")
    with pytest.raises(CheckpointConfigError, match="chat template"):
        Processor.from_pretrained(broken)
