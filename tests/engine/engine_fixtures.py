"""Prompts for engine tests, built with transformers' processor so that the reference sees the same inputs.

HF returns normalized float pixels `(u - 127.5) / 127.5`; the engine takes uint8 tiles, so they are mapped back
exactly (the inverse is exact after rounding).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from plm_serve.engine import EngineRequest, MMInput, SamplingParams
from tests import reference

TOKENS_PER_TILE = 256


@dataclass
class Prompt:
    name: str
    input_ids: list[int]
    pixel_values: torch.Tensor | None  # HF float [1, T, 3, 448, 448]
    pixel_values_videos: torch.Tensor | None
    media: list[MMInput]


def photo(width: int, height: int, seed: int) -> Image.Image:
    """A smooth, photo-like random image (noise would make every resize kernel disagree)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, size=(max(2, height // 32), max(2, width // 32), 3), dtype=np.uint8)
    return Image.fromarray(small).resize((width, height), Image.BICUBIC)


def video_frames(num_frames: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (
        rng.integers(0, 256, size=(num_frames, 64, 96, 3), dtype=np.uint8).repeat(3, axis=1).repeat(3, axis=2)
    )


def _u8(pixels: torch.Tensor) -> torch.Tensor:
    return (pixels * 127.5 + 127.5).round().clamp(0, 255).to(torch.uint8)


def _media(input_ids: list[int], token_id: int, tiles: list[torch.Tensor], kind: str) -> list[MMInput]:
    """Split the placeholder runs of `token_id` into one MMInput per media item, in order."""
    out, pos = [], 0
    for t in tiles:
        length = t.shape[0] * TOKENS_PER_TILE
        pos = input_ids.index(token_id, pos)
        assert input_ids[pos : pos + length] == [token_id] * length
        u8 = _u8(t)
        digest = hashlib.sha256(u8.numpy().tobytes()).hexdigest()
        out.append(MMInput(content_hash=digest, pixels=u8, offset=pos, length=length, kind=kind))
        pos += length
    return out


def build_prompt(processor, name: str, text: str, images=(), video=None, system: str | None = None) -> Prompt:
    """Render with the HF chat template and expand placeholders as the HF processor does.

    Images are preprocessed one by one: the HF processor cannot stack images of different tile counts in one
    call, while the model itself only needs every tile in placeholder order ([1, sum T, 3, 448, 448]).
    """
    content = [{"type": "image"} for _ in images]
    if video is not None:
        content.append({"type": "video"})
    content.append({"type": "text", "text": text})
    conv = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": content}
    ]
    rendered = processor.apply_chat_template(conv, add_generation_prompt=True)
    tiles = [processor.image_processor(images=[im], return_tensors="pt")["pixel_values"][0] for im in images]
    for t in tiles:
        rendered = rendered.replace("<|image|>", "<|IMG|>" * (t.shape[0] * TOKENS_PER_TILE), 1)
    rendered = rendered.replace("<|IMG|>", "<|image|>")
    frames = None
    if video is not None:
        frames = processor.video_processor(videos=[video], return_tensors="pt")["pixel_values_videos"][0]
        rendered = rendered.replace("<|video|>", "<|video|>" * (frames.shape[0] * TOKENS_PER_TILE), 1)
    ids = processor.tokenizer(rendered, add_special_tokens=False)["input_ids"]
    media = _media(ids, reference.IMAGE_TOKEN_ID, tiles, "image")
    if frames is not None:
        media += _media(ids, reference.VIDEO_TOKEN_ID, [frames], "video")
    media.sort(key=lambda m: m.offset)
    pv = torch.cat(tiles)[None] if tiles else None
    pvv = frames[None] if frames is not None else None
    return Prompt(name, ids, pv, pvv, media)


def standard_prompts(processor) -> list[Prompt]:
    """Text, one image, two images, a video, and a system prompt: the shapes a server sees."""
    return [
        build_prompt(processor, "text", "Write a haiku about the sea."),
        build_prompt(processor, "image", "Describe the image.", images=[photo(640, 480, 1)]),
        build_prompt(
            processor, "two-images", "Compare them.", images=[photo(300, 500, 2), photo(900, 300, 3)]
        ),
        build_prompt(processor, "video", "What happens?", video=video_frames(4, 4)),
        build_prompt(processor, "system", "Hi!", system="You are terse."),
    ]


def request(prompt: Prompt, request_id: str, **sampling) -> EngineRequest:
    return EngineRequest(request_id, list(prompt.input_ids), SamplingParams(**sampling), list(prompt.media))


def hf_greedy(model, prompt: Prompt, max_new_tokens: int) -> list[int]:
    """transformers' generate(), greedy, EOS suppressed for the first `max_new_tokens` (= min_tokens)."""
    kwargs = {}
    if prompt.pixel_values is not None:
        kwargs["pixel_values"] = prompt.pixel_values
    if prompt.pixel_values_videos is not None:
        kwargs["pixel_values_videos"] = prompt.pixel_values_videos
    ids = torch.tensor([prompt.input_ids])
    out = model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        do_sample=False,
        max_new_tokens=max_new_tokens,
        min_new_tokens=max_new_tokens,
        **kwargs,
    )
    return out[0, ids.shape[1] :].tolist()
