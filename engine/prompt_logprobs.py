"""Prompt logprobs (scoring): each prompt token's log-probability under the model, computed during prefill.

Public API:
    scoring = prompt_scoring(seq, start, num_tokens)           # scheduler: what a chunk of `seq` is to score
    entries = compute_prompt_logprobs(model, hidden, chunks)   # runner, once per step, from `chunk.scoring`
    collector.add(entries); collector.take(...)                # core: gathered until the first output

Prompt token p (p >= 1) is scored by the logits of position p - 1: log_softmax(logits[p - 1])[token_p], in fp32,
from the raw model distribution (no temperature, penalties or grammar), with its rank (1 = the most likely) and
the k best alternatives. Nothing predicts token 0, so its entry is None (as OpenAI and vLLM report it).

Memory: a prefill chunk's hidden rows are turned into logits at most `ROWS_PER_SLICE` at a time, so the work
never holds more than [ROWS_PER_SLICE, vocab] fp32 logits (64 MB at 128k), whatever the prompt length.

Only choice 0 of a request is scored (the prompt is the same for every choice). Its positions must be computed,
not read from the prefix cache: `needs_prompt_logprobs` tells the scheduler so. After a preemption the prompt is
recomputed and the collector keeps the first result of each position. Scoring reads its results back to the host
inside `ModelRunner.launch` (one sync), and a step that scores has prefill rows, so it is never a CUDA graph.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import torch

from plm_serve.engine.request import SamplingParams, TokenLogprob
from plm_serve.engine.scheduler_output import PromptScoring

if TYPE_CHECKING:
    from plm_serve.engine.scheduler_output import ScheduledChunk
    from plm_serve.models import PerceptionLM


class _Choice(Protocol):
    """What scoring reads of a sequence (engine/sequence.py; not imported: the runner imports this module)."""

    seq_id: int
    index: int
    sampling: SamplingParams
    token_ids: list[int]
    num_prompt_tokens: int

    @property
    def num_output_tokens(self) -> int: ...


ROWS_PER_SLICE = 128


@dataclass(slots=True)
class PromptTokenLogprob:
    """The score of prompt token `position` (>= 1)."""

    position: int
    token_id: int
    logprob: float
    rank: int
    top: list[tuple[int, float]]  # (token id, logprob), best first


def needs_prompt_logprobs(seq: _Choice) -> bool:
    """Whether `seq` still has prompt positions to score (choice 0, before its first output token)."""
    return seq.sampling.prompt_logprobs is not None and seq.index == 0 and seq.num_output_tokens == 0


def prompt_scoring(seq: _Choice, start: int, num_tokens: int) -> PromptScoring | None:
    """What the chunk `[start, start + num_tokens)` of `seq` scores: the prompt tokens its rows predict."""
    end = min(start + num_tokens, seq.num_prompt_tokens - 1)  # rows whose next token is still in the prompt
    if not needs_prompt_logprobs(seq) or start >= end:
        return None
    return PromptScoring(seq.sampling.prompt_logprobs or 0, seq.token_ids[start + 1 : end + 1])


def compute_prompt_logprobs(
    model: PerceptionLM, hidden: torch.Tensor, chunks: Sequence[ScheduledChunk]
) -> dict[int, list[PromptTokenLogprob]]:
    """Scores of the prompt tokens that this step's chunks predict. hidden: [T, H], the chunks' rows back to
    back in `chunks` order; `model.compute_logits` maps [N, H] -> [N, V] fp32. Returns seq_id -> entries."""
    out: dict[int, list[PromptTokenLogprob]] = {}
    row_starts = itertools.accumulate((c.num_tokens for c in chunks), initial=0)
    for chunk, row0 in zip(chunks, row_starts, strict=False):
        scoring = chunk.scoring
        if scoring is None:
            continue
        entries = out.setdefault(chunk.seq_id, [])
        for lo in range(0, len(scoring.targets), ROWS_PER_SLICE):
            hi = min(lo + ROWS_PER_SLICE, len(scoring.targets))
            rows = hidden[row0 + lo : row0 + hi]
            entries.extend(_score(model, rows, scoring.targets[lo:hi], chunk.start + lo + 1, scoring.k))
    return out


def _score(
    model: PerceptionLM, rows: torch.Tensor, targets: list[int], first_position: int, k: int
) -> list[PromptTokenLogprob]:
    logprobs = torch.log_softmax(model.compute_logits(rows).float(), dim=-1)  # [N, V]
    target = torch.tensor(targets, dtype=torch.long, device=logprobs.device)[:, None]
    chosen = logprobs.gather(1, target)  # [N, 1]
    ranks = (logprobs > chosen).sum(dim=-1) + 1
    top_ids: list[list[int]] = [[] for _ in targets]
    top_values: list[list[float]] = [[] for _ in targets]
    if k > 0:
        top = logprobs.topk(k, dim=-1)
        top_ids, top_values = top.indices.tolist(), top.values.tolist()
    return [
        PromptTokenLogprob(first_position + i, t, lp, rank, list(zip(ids, values, strict=True)))
        for i, (t, lp, rank, ids, values) in enumerate(
            zip(targets, chosen.squeeze(1).tolist(), ranks.tolist(), top_ids, top_values, strict=True)
        )
    ]


@dataclass
class PromptLogprobsCollector:
    """Gathers each sequence's prompt scores over its prefill chunks until its first output carries them."""

    _pending: dict[int, dict[int, PromptTokenLogprob]] = field(
        default_factory=dict
    )  # seq_id -> position -> entry

    def add(self, entries: dict[int, list[PromptTokenLogprob]]) -> None:
        for seq_id, items in entries.items():
            known = self._pending.setdefault(seq_id, {})
            for item in items:
                known.setdefault(item.position, item)  # recomputed after a preemption: keep the first

    def take(self, seq: _Choice, token_text: Callable[[int], str]) -> list[TokenLogprob | None] | None:
        """The prompt's scores for the first output of `seq` (None if it did not ask), in prompt order."""
        if seq.sampling.prompt_logprobs is None or seq.index != 0:
            return None
        known = self._pending.pop(seq.seq_id, {})
        result: list[TokenLogprob | None] = [None]
        for position in range(1, seq.num_prompt_tokens):
            item = known[position]
            top = [(tid, token_text(tid), lp) for tid, lp in item.top]
            result.append(
                TokenLogprob(item.token_id, token_text(item.token_id), item.logprob, top, item.rank)
            )
        return result

    def drop(self, seq_id: int) -> None:
        self._pending.pop(seq_id, None)
