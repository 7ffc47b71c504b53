"""The messages that cross the engine's boundary: what a caller submits and what it gets back.

Everything here is a plain dataclass of ints, strings, lists and uint8 tensors, so the engine loop could move into
another process behind the same interface later.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field

import torch


class FinishReason(enum.StrEnum):
    STOP = "stop"  # an EOS/stop token or a stop string
    LENGTH = "length"  # max_tokens or the context length
    ABORT = "abort"  # aborted by the caller (client gone) or by shutdown
    ERROR = "error"  # the request failed inside the engine; `StepOutput.error` says why


STRUCTURED_OUTPUT_KINDS = ("json_schema", "json_object", "regex", "choice", "grammar")


@dataclass(frozen=True, slots=True)
class StructuredOutputParams:
    """A constraint on the output, enforced token by token by a grammar (see engine/structured_output.py).

    `kind` / `spec`:
      "json_schema": a JSON Schema as JSON text;  "json_object": any JSON object (`spec` unused);
      "regex": a regular expression (Rust `regex` syntax, anchored at both ends);
      "choice": a JSON list of strings, the output is exactly one of them;
      "grammar": a Lark grammar (llguidance's dialect, which can embed `%json {schema}`) or a GBNF grammar.
    """

    kind: str
    spec: str = ""

    def __post_init__(self) -> None:
        if self.kind not in STRUCTURED_OUTPUT_KINDS:
            raise ValueError(
                f"structured output kind {self.kind!r}: use one of {', '.join(STRUCTURED_OUTPUT_KINDS)}"
            )


@dataclass(slots=True)
class SamplingParams:
    """Per-request decoding settings (OpenAI names where OpenAI has them).

    `temperature == 0` (below `SAMPLING_EPS`) means greedy. PLM's `generation_config.json` is greedy, so the
    server passes 0 unless the client asks otherwise. Every value is bounded (`validate`).
    """

    max_tokens: int | None = 16  # None: up to the context length
    min_tokens: int = 0  # EOS and stop tokens are masked until this many tokens are out
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0  # 0: disabled
    min_p: float = 0.0
    seed: int | None = None  # reproducible whatever else is in the batch
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    stop: list[str] = field(default_factory=list)  # stop strings, never emitted
    stop_token_ids: list[int] = field(default_factory=list)  # in addition to the model's EOS ids
    ignore_eos: bool = False
    n: int = 1  # choices sharing the prompt's KV
    logprobs: int | None = None  # None: off; k >= 0: sampled token's logprob plus k top alternatives
    skip_special_tokens: bool = True
    # --- structured outputs and prompt scoring (engine/structured_output.py, engine/prompt_logprobs.py)
    structured_output: StructuredOutputParams | None = None  # constrain the output to a grammar
    prompt_logprobs: int | None = None  # None: off; k >= 0: each prompt token's logprob (and rank) + k top

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ValueError unless every value is of its type and within its bounds.

        Run at construction and again by `EngineCore.add_request` (the dataclass is mutable). Bounds are the
        engine's own, independent of any frontend: counts fit int32, seeds int64 or uint64, floats are finite
        and representable in float32 (the sampler's dtype), so no value can overflow a batched tensor.
        """
        for message in _sampling_errors(self):
            raise ValueError(message)

    @property
    def greedy(self) -> bool:
        """Argmax decoding: temperature (or top_p) below `SAMPLING_EPS`, or top_k 1. Dividing logits by a
        temperature that small would overflow float32 rather than sharpen the distribution."""
        return self.temperature < SAMPLING_EPS or self.top_p < SAMPLING_EPS or self.top_k == 1


SAMPLING_EPS = 1e-5  # temperatures / top_p below this sample greedily (vLLM's threshold)
MAX_COUNT = 2**31 - 1  # max_tokens, min_tokens, top_k, token ids: int32 on the device
MAX_CHOICES = 2**16
MAX_TOP_LOGPROBS = 20
_INT64_MIN, _UINT64_MAX = -(2**63), 2**64 - 1
_FLOAT32_MAX = 3.4e38


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _sampling_errors(p: SamplingParams) -> list[str]:
    """Every violated bound of `p`, as messages that start with the field's name."""
    ints: list[tuple[str, object, int, int]] = [
        ("min_tokens", p.min_tokens, 0, MAX_COUNT),
        ("top_k", p.top_k, 0, MAX_COUNT),
        ("n", p.n, 1, MAX_CHOICES),
    ]
    if p.max_tokens is not None:
        ints.append(("max_tokens", p.max_tokens, 1, MAX_COUNT))
    if p.seed is not None:
        ints.append(("seed", p.seed, _INT64_MIN, _UINT64_MAX))
    if p.logprobs is not None:
        ints.append(("logprobs", p.logprobs, 0, MAX_TOP_LOGPROBS))
    if p.prompt_logprobs is not None:
        ints.append(("prompt_logprobs", p.prompt_logprobs, 0, MAX_TOP_LOGPROBS))
    errors = [
        f"{name} must be an integer in [{low}, {high}], got {value!r}"
        for name, value, low, high in ints
        if not (_is_int(value) and low <= value <= high)  # type: ignore[operator]
    ]
    floats = [
        ("temperature", p.temperature, 0.0, _FLOAT32_MAX),
        ("top_p", p.top_p, 0.0, 1.0),
        ("min_p", p.min_p, 0.0, 1.0),
        ("presence_penalty", p.presence_penalty, -2.0, 2.0),
        ("frequency_penalty", p.frequency_penalty, -2.0, 2.0),
        ("repetition_penalty", p.repetition_penalty, 0.01, 100.0),
    ]
    errors += [
        f"{name} must be a finite number in [{low:g}, {high:g}], got {value!r}"
        for name, value, low, high in floats
        if not (_is_real(value) and low <= value <= high)
    ]
    if _is_real(p.top_p) and p.top_p == 0.0:
        errors.append("top_p must be > 0 (0 would keep no token)")
    if not errors and p.max_tokens is not None and p.min_tokens > p.max_tokens:
        errors.append("min_tokens must be <= max_tokens")
    if not isinstance(p.logit_bias, dict) or not all(
        _is_int(k) and 0 <= k <= MAX_COUNT and _is_real(v) and -100.0 <= v <= 100.0
        for k, v in p.logit_bias.items()
    ):
        errors.append("logit_bias must map token ids to finite numbers in [-100, 100]")
    if not isinstance(p.stop_token_ids, (list, tuple)) or not all(
        _is_int(t) and 0 <= t <= MAX_COUNT for t in p.stop_token_ids
    ):
        errors.append("stop_token_ids must be a list of token ids")
    if not isinstance(p.stop, (list, tuple)) or not all(isinstance(s, str) and s for s in p.stop):
        errors.append("stop must be a list of non-empty strings")
    return errors


@dataclass(slots=True)
class MMInput:
    """One image or video of a prompt, already tiled, and where its placeholder tokens sit.

    `pixels` is uint8 [T, 3, 448, 448] (tiles of an image with the thumbnail first, or video frames); the model
    runner normalizes it on the device. `content_hash` covers the media bytes and every setting that changes the
    pixels, so equal hashes mean equal embeddings. Placeholders are `prompt_token_ids[offset : offset + length]`,
    with `length == T * tokens_per_tile`.
    """

    content_hash: str
    pixels: torch.Tensor
    offset: int
    length: int
    kind: str = "image"  # "image" or "video"

    @property
    def num_tiles(self) -> int:
        return int(self.pixels.shape[0])


@dataclass(slots=True)
class EngineRequest:
    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    mm_inputs: list[MMInput] = field(default_factory=list)  # in placeholder order, non-overlapping
    arrival_time: float = 0.0  # time.monotonic() when the server received it (for queue-time metrics)
    # Mixed into the first KV block hash: only requests with the same salt share prefix-cache blocks, so one
    # tenant cannot learn from cache hits what another sent (vLLM's `cache_salt`). None: the shared cache.
    cache_salt: str | None = None


@dataclass(slots=True)
class TokenLogprob:
    token_id: int
    token: str  # the token's text (may be a partial UTF-8 sequence rendered with U+FFFD)
    logprob: float
    top: list[tuple[int, str, float]] = field(default_factory=list)  # (token_id, text, logprob), best first
    rank: int | None = None  # 1 = the most likely token; set for prompt tokens (vLLM's prompt_logprobs)


@dataclass(slots=True)
class StepOutput:
    """What one request (one choice `index` of it) produced in one engine step.

    `text` is the new, complete-UTF-8 text since the previous output for this choice, with stop strings removed;
    `token_ids` the new token ids. The last output of a choice has `finish_reason` set.
    """

    request_id: str
    index: int
    text: str
    token_ids: list[int]
    finish_reason: FinishReason | None = None
    logprobs: list[TokenLogprob] | None = None
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    num_output_tokens: int = 0  # cumulative for this choice
    queue_time_s: float | None = None  # on the first output of a choice: arrival -> first scheduled, seconds
    error: str | None = None
    # On the first output of choice 0 when `prompt_logprobs` was asked: one entry per prompt token, the first
    # None (nothing predicts it).
    prompt_logprobs: list[TokenLogprob | None] | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None
