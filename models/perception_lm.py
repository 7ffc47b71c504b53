"""PerceptionLM = Perception Encoder ViT + projector (+ 2x2 pooling) + Llama-3 decoder.

The module tree mirrors transformers' `PerceptionLMForConditionalGeneration`, so checkpoint tensor names are
parameter names here, except that the decoder merges q/k/v and gate/up projections into one weight each (the
loader stacks those tensors, see models/merged_linear.py):

    model.vision_tower.timm_model.*   PerceptionEncoder   (vision.py)
    model.multi_modal_projector.*     MultiModalProjector (projector.py)
    model.language_model.*            LlamaModel          (llama.py)
    lm_head.weight                    (tied to the embedding when tie_word_embeddings)

The engine drives the pieces separately: `normalize_pixels` + `encode_media` per batch of tiles,
`embed_tokens` per step (the engine scatters media rows itself), `forward` on a flattened batch with its own `Attention`, then
`compute_logits` on the rows it samples. `logits_for_prompt` chains them for one prompt, like calling the
transformers model.
"""

from __future__ import annotations

import torch
from torch import nn

from plm_serve.models.attention import Attention, DenseCausalAttention
from plm_serve.models.config import PLMConfig
from plm_serve.models.llama import LlamaModel
from plm_serve.models.projector import MultiModalProjector
from plm_serve.models.vision import PerceptionEncoder


class PerceptionLMModel(nn.Module):
    """The backbone: vision tower, projector and decoder (transformers `PerceptionLMModel`)."""

    def __init__(self, config: PLMConfig) -> None:
        super().__init__()
        # transformers wraps the timm tower in `TimmWrapperModel` (attribute `timm_model`); a ModuleDict keeps
        # the `vision_tower.timm_model.` prefix of the checkpoint names without an extra class.
        self.vision_tower = nn.ModuleDict({"timm_model": PerceptionEncoder(config.vision)})
        self.multi_modal_projector = MultiModalProjector(
            config.vision.embed_dim, config.text.hidden_size, config.projector_pooling_ratio
        )
        self.language_model = LlamaModel(config.text)


class PerceptionLM(nn.Module):
    """PerceptionLM for inference. Build it with `models.load_model` (checkpoint) or `models.build_model`."""

    def __init__(self, config: PLMConfig) -> None:
        super().__init__()
        self.config = config
        self.model = PerceptionLMModel(config)
        self.lm_head = nn.Linear(config.text.hidden_size, config.text.vocab_size, bias=False)
        self.tie_weights()
        self._pixel_stats: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}  # per device, see below

    # ------------------------------------------------------------------------------------------------ set-up
    def tie_weights(self) -> None:
        """Share the input embedding with the LM head when the checkpoint ties them (PLM-1B/3B)."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.language_model.embed_tokens.weight

    def reset_buffers(self) -> None:
        """Recompute the non-persistent RoPE tables (after materializing a model built on the meta device)."""
        for module in self.modules():
            reset = getattr(module, "reset_buffers", None) if module is not self else None
            if callable(reset):
                reset()

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    # ------------------------------------------------------------------------------------------------ vision
    def normalize_pixels(self, pixels_u8: torch.Tensor) -> torch.Tensor:
        """uint8 [N, 3, S, S] -> normalized float [N, 3, S, S] in the model dtype (on the pixels' device).

        Uses the checkpoint's processor settings the way transformers applies them (rescale folded into the
        normalization, fp32): for the released models exactly (x - 127.5) / 127.5.
        """
        pix = self.config.pixel
        x = pixels_u8.to(torch.float32, copy=True)  # never the caller's tensor, even if already fp32
        if pix.do_normalize:
            mean, std = self._pixel_mean_std(x.device)
            x = x.sub_(mean).div_(std)  # in place: x is our own fp32 copy (37 tiles = 89 MB)
        elif pix.do_rescale:
            x = x.mul_(pix.rescale_factor)
        return x.to(self.dtype)

    def _pixel_mean_std(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, std) [1, 3, 1, 1] fp32 with the rescale folded in; made once per device."""
        if device not in self._pixel_stats:
            pix = self.config.pixel
            scale = 1.0 / pix.rescale_factor if pix.do_rescale else 1.0
            # transformers: torch.tensor(mean) * (1 / rescale_factor), in fp32
            mean = torch.tensor(pix.image_mean, dtype=torch.float32) * scale
            std = torch.tensor(pix.image_std, dtype=torch.float32) * scale
            self._pixel_stats[device] = (mean.view(1, 3, 1, 1).to(device), std.view(1, 3, 1, 1).to(device))
        return self._pixel_stats[device]

    def encode_media(self, pixels: torch.Tensor) -> torch.Tensor:
        """Normalized tiles or frames [N, 3, S, S] -> decoder embeddings [N, tokens_per_tile, H].

        Tiles are independent; all N go through the tower as one batch (callers bound N for memory).
        """
        feats = self.model.vision_tower["timm_model"](pixels.to(self.dtype))  # [N, prefix + P, Dv]
        if self.config.vision_use_cls_token:
            feats = feats[:, 1:, :]  # drop CLS -> [N, P, Dv]
        return self.model.multi_modal_projector(feats)  # [N, tokens_per_tile, H]

    # -------------------------------------------------------------------------------------------------- text
    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids [T] -> [T, H]."""
        return self.model.language_model.embed_tokens(input_ids)

    def forward(
        self, inputs_embeds: torch.Tensor, positions: torch.Tensor, attention: Attention
    ) -> torch.Tensor:
        """A flattened batch through the decoder: inputs_embeds [T, H], positions [T] -> normed hidden [T, H].

        `attention(layer, q, k, v)` is called once per layer with q [T, nh, hd], k/v [T, nkv, hd] after RoPE
        (or `attention.rotary(layer, q, k, v, cos, sin)` before RoPE, when the backend has it).
        """
        return self.model.language_model(inputs_embeds, positions, attention)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [N, H] -> logits [N, V] in fp32 (the matmul runs in the model dtype, as in transformers)."""
        return self.lm_head(hidden).float()

    # --------------------------------------------------------------------------------------------- reference
    @torch.inference_mode()
    def logits_for_prompt(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        pixel_values_videos: torch.Tensor | None = None,
        logits_to_keep: int = 0,
    ) -> torch.Tensor:
        """One whole prompt, like transformers' forward: input_ids [S] (or [1, S]) -> logits [S, V] fp32.

        pixel_values / pixel_values_videos: normalized [..., 3, S, S] (any leading dims, e.g. the processor's
        [1, T, 3, 448, 448]); image features fill `<|image|>` rows, video features `<|video|>` rows, each in
        order. `logits_to_keep` > 0 returns only the last rows, as transformers does.
        """
        ids = input_ids.reshape(-1).to(self.device)
        embeds = self.embed_tokens(ids)
        for pixels, token_id, what in (
            (pixel_values, self.config.image_token_id, "image"),
            (pixel_values_videos, self.config.video_token_id, "video"),
        ):
            if pixels is not None:
                feats = self.encode_media(pixels.reshape(-1, *pixels.shape[-3:]).to(self.device))
                embeds = _scatter_rows(ids == token_id, embeds, feats.flatten(0, 1), what)
        positions = torch.arange(ids.shape[0], device=self.device)
        hidden = self(embeds, positions, DenseCausalAttention([ids.shape[0]]))
        if logits_to_keep > 0:
            hidden = hidden[-logits_to_keep:]
        return self.compute_logits(hidden)


def _scatter_rows(mask: torch.Tensor, embeds: torch.Tensor, rows: torch.Tensor, what: str) -> torch.Tensor:
    """embeds [T, H] with the rows where mask [T] is true replaced, in order, by rows [M, H]."""
    n = int(mask.sum())
    if n != rows.shape[0]:
        raise ValueError(
            f"{what} placeholders and features do not match: {n} placeholder tokens, {rows.shape[0]} rows"
        )
    return embeds.masked_scatter(mask[:, None], rows.to(embeds.dtype))
