"""Engine configuration: one frozen, validated dataclass built once at start-up.

Public API:
    EngineConfig(model=..., **fields)          # validated in __post_init__ (ValueError, actionable text)
    config.replace(**changes) -> EngineConfig   # a new validated copy (a config never mutates)

The field docstrings are the CLI's help (server/flags.py reads them), and YAML presets are parsed by the CLI
(server/presets.py): there is one preset loader. Facts of the checkpoint (its context length, EOS ids, tokens
per tile) are not settings: the engine reads them from the loaded model and validates these settings against
them. Values discovered at runtime (the number of KV blocks after profiling) live in runtime objects.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal, get_args

DType = Literal["auto", "float32", "bfloat16", "float16"]
Device = Literal["auto", "cpu", "cuda"]
AttentionBackend = Literal["auto", "torch", "triton"]
_DTYPES = get_args(DType)
_DEVICES = get_args(Device)
ATTENTION_BACKENDS = get_args(AttentionBackend)


@dataclass(frozen=True, slots=True)
class EngineConfig:
    """Settings of one engine (one model on one device). Frozen: derive a new one with `replace()`."""

    model: str
    """Path of the checkpoint folder (config.json, safetensors, tokenizer files)."""

    dtype: DType = "auto"
    """Weights/activations dtype: "auto" (bfloat16 on CUDA, float32 on CPU), "float32", "bfloat16",
    "float16"."""

    device: Device = "auto"
    """"auto" (CUDA when available, else CPU), "cpu" or "cuda"."""

    max_model_len: int | None = None
    """Longest sequence (prompt + output) in tokens; None = the model's maximum (its
    max_position_embeddings: 11520 for the released PerceptionLM checkpoints)."""

    max_num_seqs: int = 256
    """Most sequences (choices) running at once, i.e. the largest decode batch."""

    max_num_batched_tokens: int = 16384
    """Token budget of one step (decode tokens + prefill chunks). Longer prompts are prefilled in
    chunks, and a chunk may split an image's placeholder range (the encoder output is cached), so it
    need not hold the largest image; it must be >= max_num_seqs so every running sequence can decode
    in one step."""

    block_size: int = 16
    """Tokens per KV-cache block (the paging and prefix-caching granularity)."""

    num_kv_blocks: int | None = None
    """Fixed number of KV blocks (used on CPU and in tests); None = size the pool by profiling GPU memory."""

    gpu_memory_utilization: float = 0.9
    """Fraction of the GPU's memory the engine may use (weights + activations + KV cache), in (0, 1]."""

    enable_prefix_caching: bool = True
    """Reuse the KV of full blocks shared with earlier prompts (keyed by tokens and media hashes)."""

    encoder_cache_tokens: int = 37888
    """Capacity of the vision-encoder output cache in embedding rows (one per placeholder token). The default
    holds 4 of the largest images (37 tiles x 256 rows); a media item larger than this is rejected."""

    max_encoder_tiles_per_step: int = 74
    """Vision-encoder compute budget per step, in tiles (or video frames); the default is 2 of the largest
    images. One item per step is
    always allowed even if it alone exceeds the budget, so large items never starve."""

    max_prefill_tokens_per_decode_step: int | None = 256
    """Most prefill tokens (prompt chunks, summed) in a step that also runs decodes; None = the whole token
    budget. This is the setting that trades time to first token for inter-token latency under load: a
    9.3k-token image prompt arriving while streams decode is spread over ~37 steps of 256 tokens, each about
    1.5x a plain decode step for PLM-1B on an H200 (estimate), instead of one long step that stalls every
    stream. Lower it for smoother streams; raise it (or None) for faster first tokens and prompt throughput.
    Steps without decodes always use the whole `max_num_batched_tokens`, so an idle server answers at full
    speed. See docs/engine-gpu.md."""

    attention_backend: AttentionBackend = "auto"
    """Paged-attention kernels: "auto" (Triton on CUDA when it imports and supports the head size, else
    PyTorch), "torch" (plain PyTorch: runs anywhere, the reference) or "triton" (fails at start-up where its
    kernels cannot run). Only the Triton backend can be captured in CUDA graphs."""

    enable_cuda_graphs: bool = True
    """Replay decode-only steps as CUDA graphs captured at start-up for bucketed batch sizes (only on CUDA,
    with an attention backend that can be captured; other steps run eagerly)."""

    overlap_scheduling: bool | None = None
    """Schedule and prepare step N+1 while the device runs step N (outputs are the same tokens, one step
    later); None = on for CUDA, off on CPU (where the device is the host and nothing overlaps)."""

    max_waiting_requests: int = 1024
    """Bound of the waiting queue (in sequences); beyond it new requests get EngineOverloadedError
    (HTTP 429/503)."""

    seed: int = 0
    """Seed of the engine's global RNG (unseeded sampling); per-request seeds do not depend on it."""

    def __post_init__(self) -> None:
        for ok, message in self._checks():
            if not ok:
                raise ValueError(f"invalid engine config: {message}")

    def _checks(self) -> list[tuple[bool, str]]:
        return [
            (bool(self.model), "model must be the path of a checkpoint folder"),
            (self.dtype in _DTYPES, f"dtype={self.dtype!r}: use one of {', '.join(_DTYPES)}"),
            (self.device in _DEVICES, f"device={self.device!r}: use one of {', '.join(_DEVICES)}"),
            (
                self.attention_backend in ATTENTION_BACKENDS,
                f"attention_backend={self.attention_backend!r}: use one of {', '.join(ATTENTION_BACKENDS)}",
            ),
            (
                self.max_model_len is None or self.max_model_len >= 1,
                f"max_model_len={self.max_model_len}: must be at least 1, or unset for the model's maximum",
            ),
            (self.max_num_seqs >= 1, f"max_num_seqs={self.max_num_seqs}: must be at least 1"),
            (
                self.max_num_batched_tokens >= self.max_num_seqs,
                f"max_num_batched_tokens={self.max_num_batched_tokens} is below "
                f"max_num_seqs={self.max_num_seqs}: every running sequence needs one token per decode "
                "step; raise max_num_batched_tokens or lower max_num_seqs",
            ),
            (self.block_size >= 1, f"block_size={self.block_size}: must be at least 1 (16 is typical)"),
            (
                self.num_kv_blocks is None or self.num_kv_blocks >= 1,
                f"num_kv_blocks={self.num_kv_blocks}: must be at least 1, or unset to profile GPU memory",
            ),
            (
                0.0 < self.gpu_memory_utilization <= 1.0,
                f"gpu_memory_utilization={self.gpu_memory_utilization}: must be in (0, 1]",
            ),
            (
                self.encoder_cache_tokens >= 1,
                f"encoder_cache_tokens={self.encoder_cache_tokens}: must be at least 1 (media items larger "
                "than the cache are rejected)",
            ),
            (
                self.max_encoder_tiles_per_step >= 1,
                f"max_encoder_tiles_per_step={self.max_encoder_tiles_per_step}: must be at least 1",
            ),
            (
                self.max_prefill_tokens_per_decode_step is None
                or self.max_prefill_tokens_per_decode_step >= 1,
                f"max_prefill_tokens_per_decode_step={self.max_prefill_tokens_per_decode_step}: must be at "
                "least 1, or unset for the whole token budget",
            ),
            (
                self.max_waiting_requests >= 1,
                f"max_waiting_requests={self.max_waiting_requests}: must be at least 1",
            ),
        ]

    def replace(self, **changes: Any) -> EngineConfig:
        """A validated copy with `changes` applied; unknown names raise ValueError."""
        _check_names(changes)
        return dataclasses.replace(self, **changes)


def _check_names(values: dict[str, Any]) -> None:
    known = {f.name for f in dataclasses.fields(EngineConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown engine setting(s) {unknown}; valid ones: {sorted(known)}")
