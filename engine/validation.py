"""What `EngineCore.add_request` checks against the loaded model before a request may join a batch.

The engine trusts no frontend: every id must index the vocabulary, every sampling value must be within the
bounds the batched tensors can hold (`SamplingParams.validate`), and media placeholder ids may appear only
where a media item says its embeddings go. A request that fails here raises `RequestRejectedError` (HTTP 400)
and never reaches a step, so it cannot fail anyone else's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from plm_serve.engine.errors import RequestRejectedError
from plm_serve.engine.request import EngineRequest, MMInput


@dataclass(frozen=True, slots=True)
class ModelLimits:
    """The facts of the loaded model that requests are checked against."""

    vocab_size: int
    placeholder_ids: dict[str, int]  # media kind ("image", "video") -> its placeholder token id
    tokens_per_tile: int  # embedding rows the vision tower + projector make per tile or frame
    max_waiting: int  # a request with more choices than the queue holds could never be queued


def validate_request(request: EngineRequest, limits: ModelLimits) -> None:
    """Raise RequestRejectedError for anything in `request` that a batched step could not take."""
    try:
        request.sampling.validate()
    except ValueError as exc:
        raise RequestRejectedError(str(exc)) from None
    sampling, vocab = request.sampling, limits.vocab_size
    _check_ids(request.prompt_token_ids, vocab, "prompt token ids")
    _check_ids(sampling.stop_token_ids, vocab, "stop_token_ids")
    _check_ids(list(sampling.logit_bias), vocab, "logit_bias token ids")
    if sampling.top_k > vocab:
        raise RequestRejectedError(f"top_k={sampling.top_k} is larger than the vocabulary ({vocab})")
    if sampling.n > limits.max_waiting:
        raise RequestRejectedError(f"n={sampling.n} is more than the engine queues ({limits.max_waiting})")
    _check_placeholders(request.prompt_token_ids, request.mm_inputs, limits)
    if request.cache_salt is not None and not isinstance(request.cache_salt, str):
        raise RequestRejectedError("cache_salt must be a string")


def _check_ids(ids: list[int], vocab_size: int, what: str) -> None:
    if not ids:
        return
    if not all(type(i) is int for i in ids):
        raise RequestRejectedError(f"{what} must be integers")
    low, high = min(ids), max(ids)
    if low < 0 or high >= vocab_size:
        bad = low if low < 0 else high
        raise RequestRejectedError(f"{what}: {bad} is outside the vocabulary [0, {vocab_size})")


def _check_placeholders(ids: list[int], items: list[MMInput], limits: ModelLimits) -> None:
    """Placeholder ids exactly fill the items' ranges: none outside them, none of the wrong kind inside.

    (Ranges being ordered, disjoint and within the prompt is the scheduler's check.) A stray placeholder
    would be embedded as a text token where the model expects an image; an item over text tokens would
    overwrite them with image rows.
    """
    placeholder_ids = limits.placeholder_ids
    for i, item in enumerate(items):
        token = placeholder_ids.get(item.kind)
        if token is None:
            raise RequestRejectedError(f"media item {i}: unknown kind {item.kind!r}")
        pixels = item.pixels
        if not isinstance(pixels, torch.Tensor) or pixels.dtype != torch.uint8 or pixels.dim() != 4:
            raise RequestRejectedError(f"media item {i}: pixels must be a uint8 tensor [T, 3, H, W]")
        if pixels.shape[0] < 1 or pixels.shape[1] != 3:
            raise RequestRejectedError(f"media item {i}: pixels must be a uint8 tensor [T, 3, H, W]")
        if item.length != pixels.shape[0] * limits.tokens_per_tile:
            raise RequestRejectedError(
                f"media item {i} has {item.length} placeholders for {pixels.shape[0]} tiles, but this model "
                f"makes {limits.tokens_per_tile} embeddings per tile (processor and model configs disagree?)"
            )
        if not 0 <= item.offset <= len(ids) - item.length:
            continue  # out of the prompt: the scheduler's message says so
        if ids[item.offset : item.offset + item.length].count(token) != item.length:
            raise RequestRejectedError(
                f"media item {i} ({item.kind}): its placeholder range holds other tokens than {token}"
            )
    expected = sum(item.length for item in items)
    found = sum(ids.count(token) for token in set(placeholder_ids.values()))
    if found != expected:
        raise RequestRejectedError(
            f"the prompt has {found} media placeholder tokens but its media items cover {expected}; "
            "placeholder ids are only valid where a media item's embeddings go"
        )
