"""`Processor`: chat messages or plain text -> token ids with media placeholder runs + uint8 pixels.

Order of work in `process_chat` (cheap checks first, pixels last):
1. validate messages and parts;
2. refuse text that cannot fit from its size alone (a token covers at most `max_chars_per_token`
   characters), before any tokenization;
3. read media headers only (image size and orientation; video frame count and timestamps);
4. count tokens per media item from those sizes alone;
5. render the chat template, tokenize (only the template's markers are control tokens, see
   special_tokens.py; the GIL is released meanwhile), expand each placeholder to its token count;
6. reject over-long prompts (`PromptTooLongError`) before any pixel is decoded or resized;
7. decode and tile the pixels.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer

from plm_serve.processors.chat_template import ChatTemplate, load_chat_template
from plm_serve.processors.config import ProcessorSettings, load_processor_settings
from plm_serve.processors.content import DETAIL_VALUES, ImageInput, VideoInput
from plm_serve.processors.errors import (
    InvalidContentError,
    MediaTooLargeError,
    ProcessorError,
    PromptTooLongError,
)
from plm_serve.processors.image_decode import ProbedImage, decode_image, probe_image
from plm_serve.processors.limits import MediaLimits
from plm_serve.processors.messages import MediaPart, parse_messages
from plm_serve.processors.special_tokens import TemplateTokenizer
from plm_serve.processors.tiling import Grid, select_grid, tile_image
from plm_serve.processors.tokenizer import (
    TokenizerConfig,
    encode_texts,
    load_tokenizer,
    load_tokenizer_config,
    max_chars_per_token,
    token_id,
)
from plm_serve.processors.tool_prompt import render_tool_messages
from plm_serve.processors.video import ProbedVideo, count_frames, decode_frames, frame_targets, probe_video


@dataclass(slots=True)
class ProcessedMedia:
    """One image or video of a prompt: pixels and where its placeholder run sits in the token ids.

    pixels: uint8 [T, 3, 448, 448]: an image's thumbnail then its tiles (row-major), or a video's frames. The
    model normalizes them. token_ids[offset : offset + length] are the placeholders; length = T × tokens per
    tile. content_hash: sha256 of the bytes and of every setting that changes the pixels (equal hash, equal
    embeddings).
    """

    kind: str
    content_hash: str
    pixels: torch.Tensor
    offset: int
    length: int
    num_tiles: int


@dataclass(slots=True)
class ProcessedPrompt:
    """Token ids of a prompt and its media in placeholder order (ascending offset)."""

    token_ids: list[int]
    media: list[ProcessedMedia]

    @property
    def num_media_tokens(self) -> int:
        return sum(m.length for m in self.media)


@dataclass(slots=True)
class _Plan:
    """A media item after step 2/3: its token cost and what the pixel step needs."""

    kind: str
    param: str
    num_tiles: int
    length: int
    data: bytes
    hash_params: dict[str, Any]
    probe: ProbedImage | ProbedVideo
    grid: Grid | None = None  # images, thumb+tile mode
    targets: list[int] | None = None  # videos: sample times


class Processor:
    """Tokenizer, chat template and media preprocessing of a PLM checkpoint; stateless, thread-safe.

    `control_tokens_in_text=True` restores the old tokenization of chat prompts: special-token strings inside
    message text become control tokens (a user can then forge turns; the default treats them as text).
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        tokenizer_config: TokenizerConfig,
        chat_template: str,
        settings: ProcessorSettings,
        limits: MediaLimits | None = None,
        resize_device: str | torch.device | None = None,
        control_tokens_in_text: bool = False,
    ) -> None:
        self.tokenizer = tokenizer
        self.control_tokens_in_text = control_tokens_in_text
        self.template_tokenizer = None if control_tokens_in_text else TemplateTokenizer(tokenizer)
        self.max_chars_per_token = max_chars_per_token(tokenizer)
        self.tokenizer_config = tokenizer_config
        self.settings = settings
        self.limits = limits or MediaLimits()
        self.template = ChatTemplate(chat_template, tokenizer_config.template_tokens())
        self.image_token_id = token_id(tokenizer, tokenizer_config.image_token, "image token")
        self.video_token_id = token_id(tokenizer, tokenizer_config.video_token, "video token")
        self.bos_token_id = (
            tokenizer.token_to_id(tokenizer_config.bos_token) if tokenizer_config.bos_token else None
        )
        # Where tiles are resized; None: the CPU (bit-exact with transformers on the CPU). Pixels stay there.
        self.resize_device = torch.device(resize_device) if resize_device is not None else None
        self._fingerprint = settings.fingerprint()

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        limits: MediaLimits | None = None,
        *,
        resize_device: str | None = None,
        chat_template: str | None = None,
        control_tokens_in_text: bool = False,
    ) -> Processor:
        """Load a checkpoint: tokenizer.json, tokenizer_config.json, chat template, processor config.
        `chat_template` (template source) replaces the checkpoint's template."""
        folder = Path(path)
        settings = load_processor_settings(folder)  # first: a bad config fails before the slow tokenizer load
        tokenizer_config = load_tokenizer_config(folder)
        return cls(
            tokenizer=load_tokenizer(folder),
            tokenizer_config=tokenizer_config,
            chat_template=chat_template or load_chat_template(folder, tokenizer_config.raw),
            settings=settings,
            limits=limits,
            resize_device=resize_device,
            control_tokens_in_text=control_tokens_in_text,
        )

    # ------------------------------------------------------------------------------------------ token counts

    def count_image_tokens(
        self, width: int, height: int, detail: str = "auto", max_num_tiles: int | None = None
    ) -> int:
        """Placeholder tokens of a `width`×`height` image (no pixels needed)."""
        grid = self._grid(width, height, detail, max_num_tiles)
        return (1 + (grid[0] * grid[1] if grid else 0)) * self.settings.tokens_per_tile

    def _grid(self, width: int, height: int, detail: str, max_num_tiles: int | None) -> Grid | None:
        """The tile grid, or None for a single stretched tile (detail "low" or a non-tiling checkpoint)."""
        if detail not in DETAIL_VALUES:
            raise InvalidContentError(f"detail must be one of {', '.join(DETAIL_VALUES)}, got {detail!r}")
        image = self.settings.image
        if detail == "low" or not image.tiled:
            return None
        limit = image.max_num_tiles
        if max_num_tiles is not None:
            if isinstance(max_num_tiles, bool) or not isinstance(max_num_tiles, int) or max_num_tiles < 1:
                raise InvalidContentError(f"max_num_tiles must be a positive integer, got {max_num_tiles!r}")
            limit = min(limit, max_num_tiles)  # a request may lower the grid budget, never raise it
        return select_grid(width, height, image.tile_size, limit)

    # ------------------------------------------------------------------------------------------ chat prompts

    def process_chat(
        self,
        messages: list[dict[str, Any]],
        *,
        tools: list[dict[str, Any]] | None = None,
        add_generation_prompt: bool = True,
        max_prompt_tokens: int | None = None,
    ) -> ProcessedPrompt:
        """Messages -> token ids (chat template applied, placeholders expanded) and tiled media.

        `tools` are OpenAI tool definitions ({"type": "function", "function": {...}}) to show the model; a
        template that does not render tools itself gets them written in by `tool_prompt.py`."""
        markers = (self.tokenizer_config.image_token, self.tokenizer_config.video_token)
        parsed = parse_messages(messages, markers)
        count = len(parsed.images) + len(parsed.videos)
        if count > self.limits.max_media_per_request:
            raise MediaTooLargeError(
                f"the request has {count} images/videos, "
                f"over the limit of {self.limits.max_media_per_request}",
                param="messages",
            )
        if max_prompt_tokens is not None:
            self._check_text_size(sum(map(len, _texts(parsed.messages))), max_prompt_tokens, "messages")
        images = [self._plan_image(p) for p in parsed.images]
        videos = [self._plan_video(p) for p in parsed.videos]
        ids = self._tokenize_chat(
            parsed.messages, tools, add_generation_prompt
        )  # the template starts with BOS
        token_ids, offsets = self._expand(ids, images, videos)
        if max_prompt_tokens is not None and len(token_ids) > max_prompt_tokens:
            raise _too_long(len(token_ids), max_prompt_tokens, images + videos)
        media = [
            ProcessedMedia(
                kind=plan.kind,
                content_hash=self._hash(plan.data, plan.kind, plan.hash_params),
                pixels=self._pixels(plan),
                offset=offset,
                length=plan.length,
                num_tiles=plan.num_tiles,
            )
            for offset, plan in sorted(offsets, key=lambda item: item[0])
        ]
        return ProcessedPrompt(token_ids, media)

    def process_prompt(self, text: str, *, max_prompt_tokens: int | None = None) -> ProcessedPrompt:
        """Plain text (/v1/completions) -> token ids with BOS, like `tokenizer(text)`."""
        if not isinstance(text, str):
            raise InvalidContentError("prompt must be a string", param="prompt")
        if max_prompt_tokens is not None:
            self._check_text_size(len(text), max_prompt_tokens, "prompt")
        (ids,) = encode_texts(self.tokenizer, [text], add_special_tokens=True)
        if self.image_token_id in ids or self.video_token_id in ids:
            raise InvalidContentError(
                "a text prompt may not contain media placeholder tokens; "
                "use /v1/chat/completions with image_url or video_url parts",
                param="prompt",
            )
        if max_prompt_tokens is not None and len(ids) > max_prompt_tokens:
            raise PromptTooLongError(
                f"the prompt has {len(ids)} tokens, over the limit of {max_prompt_tokens}",
                num_tokens=len(ids),
                limit=max_prompt_tokens,
                param="prompt",
            )
        return ProcessedPrompt(ids, [])

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        """Token ids -> text."""
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    # ------------------------------------------------------------------------------------------ internals

    def _check_text_size(self, num_chars: int, max_tokens: int, param: str) -> None:
        """PromptTooLongError for text that needs more than `max_tokens` tokens even at the most characters
        per token any token covers: refused in O(1), before tokenizing megabytes for nothing."""
        per_token = self.max_chars_per_token
        if per_token is None or -(-num_chars // per_token) <= max_tokens:
            return
        raise PromptTooLongError(
            f"the prompt has {num_chars} characters of text, which cannot fit in the limit of {max_tokens} "
            f"tokens (a token covers at most {per_token} characters); send less text",
            num_tokens=-(-num_chars // per_token),
            limit=max_tokens,
            param=param,
        )

    def _tokenize_chat(
        self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None, add_generation_prompt: bool
    ) -> list[int]:
        """Render and tokenize. Tools, tool calls and tool results are written into the message texts first
        (unless the template renders tools itself), so they are guarded like any other text: only the
        template's own markers become control tokens (processors/special_tokens.py)."""
        if not self.template.renders_tools:
            messages, tools = render_tool_messages(messages, tools), None
        if self.template_tokenizer is None:  # the old behaviour: special tokens in text are control tokens
            text = self.template.render(messages, add_generation_prompt=add_generation_prompt, tools=tools)
            return encode_texts(self.tokenizer, [text], add_special_tokens=False)[0]
        guarded = _map_texts(messages, self.template_tokenizer.guard)
        text = self.template.render(guarded, add_generation_prompt=add_generation_prompt, tools=tools)
        return self.template_tokenizer.encode(text)

    def _hash(self, data: bytes, kind: str, params: dict[str, Any]) -> str:
        h = hashlib.sha256()
        h.update(json.dumps({"kind": kind, "settings": self._fingerprint, **params}, sort_keys=True).encode())
        h.update(b"\0")
        h.update(data)  # hashlib releases the GIL on large buffers
        return h.hexdigest()

    def _plan_image(self, item: MediaPart) -> _Plan:
        part = item.part
        assert isinstance(part, ImageInput)
        try:
            if not isinstance(part.data, (bytes, bytearray, memoryview)):
                raise InvalidContentError("image data must be bytes")
            probe = probe_image(bytes(part.data), self.limits)
            grid = self._grid(probe.width, probe.height, part.detail, part.max_num_tiles)
        except ProcessorError as e:
            e.with_param(item.param)
            raise
        num_tiles = 1 + (grid[0] * grid[1] if grid else 0)
        length = num_tiles * self.settings.tokens_per_tile
        return _Plan("image", item.param, num_tiles, length, part.data, {"grid": grid}, probe, grid=grid)

    def _plan_video(self, item: MediaPart) -> _Plan:
        part = item.part
        assert isinstance(part, VideoInput)
        video = self.settings.video
        try:
            if not isinstance(part.data, (bytes, bytearray, memoryview)):
                raise InvalidContentError("video data must be bytes")
            probe = probe_video(bytes(part.data), self.limits)
            default = self.limits.default_video_frames
            if video.do_sample_frames and video.num_frames:
                default = video.num_frames
            fps = part.fps
            if part.num_frames is None and fps is None and video.do_sample_frames and video.fps:
                fps = video.fps
            frames = count_frames(probe, part.num_frames, fps, default, self.limits)
        except ProcessorError as e:
            e.with_param(item.param)
            raise
        targets = frame_targets(probe, frames)
        length = frames * self.settings.tokens_per_frame
        return _Plan(
            "video", item.param, frames, length, part.data, {"targets": targets}, probe, targets=targets
        )

    def _expand(
        self, ids: list[int], images: list[_Plan], videos: list[_Plan]
    ) -> tuple[list[int], list[tuple[int, _Plan]]]:
        """Replace the i-th image (video) placeholder by its i-th item's run of placeholder tokens."""
        queues = {self.image_token_id: images, self.video_token_id: videos}
        seen = {self.image_token_id: 0, self.video_token_id: 0}
        out: list[int] = []
        offsets: list[tuple[int, _Plan]] = []
        for token in ids:
            queue = queues.get(token)
            if queue is None:
                out.append(token)
                continue
            index = seen[token]
            seen[token] += 1
            if index < len(queue):
                offsets.append((len(out), queue[index]))
                out.extend([token] * queue[index].length)
        for token, queue in queues.items():
            if seen[token] != len(queue):
                kind = "image" if token == self.image_token_id else "video"
                raise InvalidContentError(
                    f"the chat template placed {seen[token]} {kind} placeholders for {len(queue)} {kind}s; "
                    "this checkpoint's template cannot take media in these messages",
                    param="messages",
                )
        return out, offsets

    def _pixels(self, plan: _Plan) -> torch.Tensor:
        try:
            if plan.kind == "image":
                assert isinstance(plan.probe, ProbedImage)
                image = decode_image(plan.probe, self.settings.image.do_convert_rgb)
                if self.resize_device is not None:
                    image = image.to(self.resize_device)
                settings = self.settings.image
                return tile_image(image, plan.grid, settings.tile_size, settings.mode)
            assert isinstance(plan.probe, ProbedVideo) and plan.targets is not None
            return decode_frames(plan.probe, plan.targets, self.settings.video)
        except ProcessorError as e:
            e.with_param(plan.param)
            raise


def _texts(messages: list[dict[str, Any]]) -> list[str]:
    """Every text of template-ready messages (a system string, or the text parts of a content list)."""
    out: list[str] = []
    for message in messages:
        content = message["content"]
        if isinstance(content, str):
            out.append(content)
        else:
            out += [p["text"] for p in content if p.get("type") == "text"]
    return out


def _map_texts(messages: list[dict[str, Any]], fn) -> list[dict[str, Any]]:
    """Template-ready messages with `fn` applied to every text (new dicts; the input is not modified)."""
    out = []
    for message in messages:
        content = message["content"]
        if isinstance(content, str):
            content = fn(content)
        else:
            content = [{**p, "text": fn(p["text"])} if p.get("type") == "text" else p for p in content]
        out.append({**message, "content": content})
    return out


def _too_long(num_tokens: int, limit: int, plans: list[_Plan]) -> PromptTooLongError:
    media_tokens = sum(p.length for p in plans)
    details = [
        f"{p.param}: {p.length} tokens ({p.num_tiles} {'tiles' if p.kind == 'image' else 'frames'})"
        for p in plans
    ]
    hints = []
    if any(p.kind == "image" and p.num_tiles > 1 for p in plans):
        hints.append('use detail: "low" for images (one tile, 256 tokens each)')
    if any(p.kind == "video" for p in plans):
        hints.append("sample fewer video frames (num_frames)")
    hints.append("send fewer media items or less text")
    message = (
        f"the prompt has {num_tokens} tokens, over the limit of {limit}: "
        f"{num_tokens - media_tokens} text tokens"
        + (f", {'; '.join(details)}" if details else "")
        + ". To fit, "
        + ", or ".join(hints)
        + "."
    )
    return PromptTooLongError(message, num_tokens=num_tokens, limit=limit)
