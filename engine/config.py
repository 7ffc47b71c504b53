"""Engine configuration: one frozen, validated dataclass built once at start-up.

Public API:
    EngineConfig(model=..., **fields)          # validated in __post_init__ (ValueError, actionable text)
    EngineConfig.from_yaml(path, **overrides)   # YAML mapping (top level or its `engine:` section)
    config.replace(**changes) -> EngineConfig   # a new validated copy (a config never mutates)
    config.resolved_max_model_len               # max_model_len, or PerceptionLM's 11520 when None

Values discovered at runtime (the number of KV blocks after profiling, EOS ids) live in runtime
objects, not here.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# PerceptionLM constants (perception-lm.md §3-§7): max positions, tokens per 448² tile,
# tiles of the largest image.
PLM_MAX_MODEL_LEN = 11520
TOKENS_PER_TILE = 256
MAX_IMAGE_TILES = 37
MAX_IMAGE_TOKENS = MAX_IMAGE_TILES * TOKENS_PER_TILE  # 9472

_DTYPES = ("auto", "float32", "bfloat16", "float16")
_DEVICES = ("auto", "cpu", "cuda")


@dataclass(frozen=True, slots=True)
class EngineConfig:
    """Settings of one engine (one model on one device). Frozen: derive a new one with `replace()`."""

    model: str
    """Path of the checkpoint folder (config.json, safetensors, tokenizer files)."""

    dtype: str = "auto"
    """Weights/activations dtype: "auto" (bfloat16 on CUDA, float32 on CPU), "float32", "bfloat16",
    "float16"."""

    device: str = "auto"
    """"auto" (CUDA when available, else CPU), "cpu" or "cuda"."""

    max_model_len: int | None = None
    """Longest sequence (prompt + output) in tokens; None = the model's maximum (11520 for PerceptionLM)."""

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

    encoder_cache_tokens: int = 4 * MAX_IMAGE_TOKENS
    """Capacity of the vision-encoder output cache in embedding rows (one per placeholder token).
    Must hold the largest image (9472 rows); a media item larger than this is rejected."""

    max_encoder_tiles_per_step: int = 2 * MAX_IMAGE_TILES
    """Vision-encoder compute budget per step, in tiles (or video frames). One item per step is
    always allowed even if it alone exceeds the budget, so large items never starve."""

    max_prefill_tokens_per_decode_step: int | None = 256
    """Most prefill tokens (prompt chunks, summed) in a step that also runs decodes; None = the whole token
    budget. This is the setting that trades time to first token for inter-token latency under load: a
    9.3k-token image prompt arriving while streams decode is spread over ~37 steps of 256 tokens, each about
    1.5x a plain decode step for PLM-1B on an H200 (estimate), instead of one long step that stalls every
    stream. Lower it for smoother streams; raise it (or None) for faster first tokens and prompt throughput.
    Steps without decodes always use the whole `max_num_batched_tokens`, so an idle server answers at full
    speed. See docs/engine-gpu.md."""

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
                self.max_model_len is None or 1 <= self.max_model_len <= PLM_MAX_MODEL_LEN,
                f"max_model_len={self.max_model_len}: use 1..{PLM_MAX_MODEL_LEN} (the model's maximum) "
                "or leave it unset",
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
                self.encoder_cache_tokens >= MAX_IMAGE_TOKENS,
                f"encoder_cache_tokens={self.encoder_cache_tokens} cannot hold the largest image "
                f"({MAX_IMAGE_TOKENS} rows = {MAX_IMAGE_TILES} tiles x {TOKENS_PER_TILE}); "
                f"raise it to at least {MAX_IMAGE_TOKENS}",
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

    @property
    def resolved_max_model_len(self) -> int:
        """The context length in force: `max_model_len`, or PerceptionLM's 11520 when unset."""
        return self.max_model_len if self.max_model_len is not None else PLM_MAX_MODEL_LEN

    def replace(self, **changes: Any) -> EngineConfig:
        """A validated copy with `changes` applied; unknown names raise ValueError."""
        _check_names(changes)
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides: Any) -> EngineConfig:
        """Load a YAML mapping (its `engine:` section if it has one) and apply `overrides` on top.

        Every override is applied as given (a CLI should drop the flags that were not set).
        Unknown keys raise ValueError naming the valid ones.
        """
        import yaml  # only needed here; keeps `import engine` light

        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a YAML mapping of engine settings, got {type(data).__name__}")
        section = data.get("engine", data)
        if not isinstance(section, dict):
            raise ValueError(f"{path}: the `engine:` section must be a mapping")
        values = {**section, **overrides}
        _check_names(values, source=str(path))
        return cls(**values)


def _check_names(values: dict[str, Any], source: str = "overrides") -> None:
    known = {f.name for f in dataclasses.fields(EngineConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"{source}: unknown engine setting(s) {unknown}; valid ones: {sorted(known)}")
