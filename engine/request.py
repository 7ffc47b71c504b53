"""The messages that cross the engine's boundary: what a caller submits and what it gets back.

Everything here is a plain dataclass of ints, strings, lists and uint8 tensors, so the engine loop could move into
another process behind the same interface later.
"""

from __future__ import annotations

import enum
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

    `temperature == 0` means greedy. PLM's `generation_config.json` is greedy, so the server passes 0 unless the
    client asks otherwise.
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
        checks = [
            (self.max_tokens is None or self.max_tokens >= 1, "max_tokens must be at least 1"),
            (self.min_tokens >= 0, "min_tokens must be >= 0"),
            (
                self.max_tokens is None or self.min_tokens <= self.max_tokens,
                "min_tokens must be <= max_tokens",
            ),
            (self.temperature >= 0.0, "temperature must be >= 0"),
            (0.0 < self.top_p <= 1.0, "top_p must be in (0, 1]"),
            (self.top_k >= 0, "top_k must be >= 0 (0 disables it)"),
            (0.0 <= self.min_p <= 1.0, "min_p must be in [0, 1]"),
            (-2.0 <= self.presence_penalty <= 2.0, "presence_penalty must be in [-2, 2]"),
            (-2.0 <= self.frequency_penalty <= 2.0, "frequency_penalty must be in [-2, 2]"),
            (self.repetition_penalty > 0.0, "repetition_penalty must be > 0"),
            (self.n >= 1, "n must be at least 1"),
            (self.logprobs is None or 0 <= self.logprobs <= 20, "top_logprobs must be in [0, 20]"),
            (
                self.prompt_logprobs is None or 0 <= self.prompt_logprobs <= 20,
                "prompt_logprobs must be in [0, 20]",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1


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
