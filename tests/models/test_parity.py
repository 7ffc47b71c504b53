"""Our PerceptionLM against transformers + timm on the tiny checkpoints, fp32 on CPU.

Both families run: PE-L (CLS, grid offset 1) + tied embeddings + llama3 RoPE, and PE-G (no CLS, offset 0) +
untied lm_head + plain RoPE. Inputs come from the transformers processor, so placeholder counts and pixels are
its own.
"""

from __future__ import annotations

import pytest
import torch

from plm_serve.models import causal_sdpa
from tests.models.conftest import PROMPTS, Family

TOL = 1e-4


def _pixels(inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    return inputs["pixel_values"] if "pixel_values" in inputs else inputs["pixel_values_videos"]


@pytest.mark.parametrize("prompt", list(PROMPTS))
@torch.inference_mode()
def test_media_features_match(family: Family, prompt_inputs, prompt: str) -> None:
    pixels = _pixels(prompt_inputs[prompt])  # [num_media, T, 3, 448, 448]
    ref = family.hf.model.get_image_features(pixels).pooler_output  # [num_media * T, 256, H]
    ours = family.ours.encode_media(pixels.flatten(0, 1))
    assert ours.shape == ref.shape == (pixels.shape[0] * pixels.shape[1], 256, ref.shape[-1])
    assert (ours - ref).abs().max().item() <= TOL


@pytest.mark.parametrize("prompt", list(PROMPTS))
@torch.inference_mode()
def test_full_sequence_logits_match(family: Family, prompt_inputs, prompt: str) -> None:
    inputs = prompt_inputs[prompt]
    ref = family.hf(**inputs).logits[0]  # [S, V]
    ours = family.ours.logits_for_prompt(
        inputs["input_ids"][0], inputs.get("pixel_values"), inputs.get("pixel_values_videos")
    )
    assert ours.dtype == torch.float32
    assert ours.shape == ref.shape
    assert (ours - ref).abs().max().item() <= TOL


class ContiguousKVCache:
    """The simplest cached `Attention`: one growing K/V tensor per layer for a single sequence."""

    def __init__(self, num_layers: int) -> None:
        self.k: list[torch.Tensor | None] = [None] * num_layers
        self.v: list[torch.Tensor | None] = [None] * num_layers

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        old_k, old_v = self.k[layer], self.v[layer]
        self.k[layer] = k if old_k is None else torch.cat([old_k, k])
        self.v[layer] = v if old_v is None else torch.cat([old_v, v])
        full_k, full_v = self.k[layer], self.v[layer]
        return causal_sdpa(q, full_k, full_v, num_cached=full_k.shape[0] - q.shape[0])


@torch.inference_mode()
def greedy(
    family: Family, inputs: dict[str, torch.Tensor], max_new_tokens: int
) -> tuple[list[int], torch.Tensor]:
    """Prefill once (media merged), then decode one token per step through a KV cache.

    Returns the new tokens and the logits [steps, V] each was chosen from.
    """
    model = family.ours
    ids = inputs["input_ids"][0]
    pixels = _pixels(inputs)
    media_rows = model.encode_media(pixels.flatten(0, 1)).flatten(0, 1)
    is_media = (ids == model.config.image_token_id) | (ids == model.config.video_token_id)
    embeds = model.embed_tokens(ids).masked_scatter(is_media[:, None], media_rows)
    cache = ContiguousKVCache(model.config.text.num_hidden_layers)
    hidden = model(embeds, torch.arange(ids.shape[0]), cache)
    tokens: list[int] = []
    step_logits = []
    for step in range(max_new_tokens):
        logits = model.compute_logits(hidden[-1:])  # [1, V]
        step_logits.append(logits)
        tokens.append(int(logits.argmax(-1)))
        if tokens[-1] in model.config.eos_token_ids:
            break
        position = torch.tensor([ids.shape[0] + step])
        hidden = model(model.embed_tokens(torch.tensor(tokens[-1:])), position, cache)
    return tokens, torch.cat(step_logits)


@pytest.mark.parametrize("prompt", ["one_image", "video"])
def test_greedy_continuation_matches_generate(family: Family, prompt_inputs, prompt: str) -> None:
    inputs = prompt_inputs[prompt]
    with torch.inference_mode():
        ref = family.hf.generate(
            **inputs, do_sample=False, max_new_tokens=20, return_dict_in_generate=True, output_logits=True
        )
    ref_tokens = ref.sequences[0, inputs["input_ids"].shape[1] :].tolist()
    tokens, logits = greedy(family, inputs, 20)
    assert tokens == ref_tokens
    # Random weights often repeat one token, so also check every step's logits: a wrong position or cache
    # would change them even when the argmax survives.
    ref_logits = torch.cat(ref.logits)  # [steps, V]
    assert (logits - ref_logits).abs().max().item() <= TOL


@torch.inference_mode()
def test_placeholder_count_mismatch_raises(family: Family, prompt_inputs) -> None:
    model = family.ours
    ids = prompt_inputs["one_image"]["input_ids"][0]
    with pytest.raises(ValueError, match="image placeholders"):
        model.logits_for_prompt(ids[:-300], prompt_inputs["one_image"]["pixel_values"])
