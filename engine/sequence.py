"""`Sequence`: the engine-side state of one choice (`index`) of a request.

A request with `n` choices becomes `n` sequences sharing the prompt. Invariants:
  * `token_ids` = prompt + outputs known to the host, append-only; `token_ids[:num_prompt_tokens]` is the prompt.
  * `num_placeholders`: tokens sampled by steps still in flight (the overlapped loop schedules step N+1 before
    step N's token is back); `num_tokens` counts them, so the scheduler plans with the sequence's true length
    while the runner supplies those tokens from the device. Always 0 in the synchronous loop at schedule time.
  * `num_computed_tokens` <= `num_tokens`: tokens whose KV is in the cache, or being written by a scheduled
    step (it advances when a chunk is scheduled). When it reaches `num_tokens` the next token is being sampled
    (a placeholder is added). A preemption resets it to 0; at re-admission it starts at the prefix-cache hit
    and prompt + outputs are recomputed.
  * `slot`: the runner's per-sequence state row while RUNNING (-1 otherwise).
  * `block_table[i]` holds the KV of positions `[i * block_size, (i + 1) * block_size)`; it covers at
    least `num_computed_tokens` positions while RUNNING and is empty while WAITING or FINISHED.
  * `block_hashes[i]` is the chained content hash of full block i (see block_manager.py); it depends
    only on token ids, media and the cache salt, so it survives preemption. The first `num_cached_blocks` blocks of
    `block_table` are registered in the prefix cache.
  * `encoder_refs`: content hashes of media whose encoder output this sequence still needs (its
    prefill has not passed the placeholder range yet); it holds a reference on each in the encoder cache.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from plm_serve.engine.request import FinishReason, MMInput, SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"  # queued (new or preempted); holds no KV blocks
    RUNNING = "running"  # admitted; holds KV blocks
    FINISHED = "finished"  # done; holds nothing


@dataclass(slots=True, eq=False)
class Sequence:
    """One choice of a request; see the module docstring for the invariants. Compared by identity."""

    seq_id: int
    request_id: str
    index: int
    token_ids: list[int]
    num_prompt_tokens: int
    sampling: SamplingParams
    mm_inputs: list[MMInput] = field(default_factory=list)
    arrival_time: float = 0.0
    cache_salt: str | None = None  # see EngineRequest.cache_salt; part of block_hashes[0]

    status: SequenceStatus = SequenceStatus.WAITING
    slot: int = -1
    num_placeholders: int = 0
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0  # prefix-cache hit (tokens) of the latest admission
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[bytes] = field(default_factory=list)
    num_cached_blocks: int = 0
    encoder_refs: set[str] = field(default_factory=set)
    finish_reason: FinishReason | None = None
    stop_token_id: int | None = None  # the EOS/stop token that finished it (its text is never emitted)
    num_preemptions: int = 0

    first_scheduled_time: float | None = None  # time.monotonic() of the first admission
    first_token_time: float | None = None  # time.monotonic() when the first output token was appended
    finished_time: float | None = None

    # Structured outputs: this choice's grammar matcher (an llguidance.LLMatcher, see structured_output.py).
    grammar: Any = None

    @property
    def num_tokens(self) -> int:
        """Known tokens plus those being sampled by steps in flight."""
        return len(self.token_ids) + self.num_placeholders

    @property
    def num_output_tokens(self) -> int:
        """Outputs known to the host."""
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        """A copy of the generated tokens (O(outputs): not for per-step hot paths)."""
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.token_ids[: self.num_prompt_tokens]

    @property
    def is_prefill(self) -> bool:
        """More than one token left to compute (the prompt, or everything after a preemption)."""
        return self.num_tokens - self.num_computed_tokens > 1

    def __repr__(self) -> str:
        return (
            f"Sequence(id={self.seq_id}, req={self.request_id!r}#{self.index}, {self.status.value}, "
            f"computed={self.num_computed_tokens}/{self.num_tokens}, prompt={self.num_prompt_tokens}, "
            f"blocks={len(self.block_table)})"
        )
