"""What the scheduler hands the model runner each step: plain data, no live engine objects.

The runner keeps its own per-slot copy of everything a running sequence needs (its tokens, block table and
sampling parameters, on the device), so the scheduler sends a sequence's data once, when it takes a slot
(`NewSequence`), and afterwards only per-step diffs (`ScheduledChunk`: which tokens to compute, the blocks
appended to its table). Nothing here points back at a `Sequence`: the runner cannot read scheduler state that
may change while a step is in flight (the overlapped loop schedules step N+1 before step N's tokens are known).

Contract, for each `ScheduledChunk(seq_id, slot, start, num_tokens, sample, new_block_ids, media)`:
  * the chunk computes positions `start .. start + num_tokens - 1` of the sequence in `slot`; the token at
    position p is the one the runner holds for the slot at p (from `NewSequence.token_ids`, or the token it
    sampled itself in an earlier step: a decode's input may not be known to the host yet);
  * its K/V go to slot `table[p // block_size] * block_size + p % block_size`, where `table` is the slot's
    block table after appending `new_block_ids`; attention covers positions `[0, start + num_tokens)`;
  * `sample=True`: the chunk ends at the last known position: sample the token at position `start + num_tokens`
    from the logits of the chunk's last row, and report it as `sampled[seq_id]`;
  * `media`: which rows of which encoder outputs replace the embeddings of which chunk positions.
Per step the runner first drops `freed_encoder_hashes`, then encodes `encoder_inputs`, then applies
`new_sequences` (each replaces whatever its slot held before), then runs `chunks`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from plm_serve.engine.request import MMInput, SamplingParams


@dataclass(frozen=True, slots=True)
class MediaSlice:
    """Chunk positions `[chunk_pos, chunk_pos + num_rows)` (relative to the chunk's start) take rows
    `[row, row + num_rows)` of the encoder output of `content_hash`."""

    content_hash: str
    chunk_pos: int
    row: int
    num_rows: int


@dataclass(slots=True)
class NewSequence:
    """A sequence taking a slot (admitted, or re-admitted after a preemption): everything the runner keeps."""

    seq_id: int
    slot: int
    token_ids: list[int]  # every token known so far: the prompt, plus the outputs after a preemption
    num_prompt_tokens: int
    sampling: SamplingParams
    index: int  # the choice index within its request (part of the seeded sampler's key)
    block_ids: list[int]  # its whole block table at admission (shared prefix-cache blocks first)


@dataclass(frozen=True, slots=True)
class PromptScoring:
    """Score the prompt tokens this chunk predicts: rows `[0, len(targets))` of the chunk (positions
    `start .. start + len(targets) - 1`) predict `targets`; `k` alternatives each (prompt logprobs)."""

    k: int
    targets: list[int]


@dataclass(frozen=True, slots=True)
class GrammarBitmask:
    """The tokens each constrained sampling row may take this step (structured outputs): bit t of
    `bits[i]` (int32 words, [R, ceil(V / 32)], host memory) allows token t for the row of `seq_ids[i]`."""

    seq_ids: list[int]
    bits: torch.Tensor


@dataclass(slots=True)
class ScheduledChunk:
    """Compute positions `[start, start + num_tokens)` of the sequence in `slot`; if `sample`, sample the next."""

    seq_id: int
    slot: int
    start: int
    num_tokens: int
    sample: bool
    new_block_ids: list[int] = field(default_factory=list)  # appended to the slot's block table this step
    media: list[MediaSlice] = field(default_factory=list)
    scoring: PromptScoring | None = None  # prompt logprobs to compute from this chunk's rows

    @property
    def end(self) -> int:
        return self.start + self.num_tokens

    @property
    def is_decode(self) -> bool:
        return self.num_tokens == 1 and self.sample


@dataclass(slots=True)
class SchedulerOutput:
    chunks: list[ScheduledChunk]
    new_sequences: list[NewSequence]  # slots (re)filled this step, applied before the chunks run
    encoder_inputs: list[MMInput]  # to encode this step, deduplicated by content_hash
    freed_encoder_hashes: list[str]  # evicted from the encoder cache: drop these tensors (before encoding)
    preempted: list[int]  # seq ids that lost their KV and slot this step (they come back as new sequences)
    num_batched_tokens: int
    isolated: str | None = None  # the request running alone (fault isolation; the runner ignores it)
    grammar: GrammarBitmask | None = None  # set by the engine core after scheduling

    @property
    def is_empty(self) -> bool:
        """No chunk to run (there may still be media to encode or to drop)."""
        return not self.chunks

    @property
    def has_work(self) -> bool:
        """Anything for the runner at all."""
        return bool(self.chunks or self.encoder_inputs or self.freed_encoder_hashes or self.new_sequences)

    @property
    def is_decode_only(self) -> bool:
        return bool(self.chunks) and all(c.is_decode for c in self.chunks)
