"""Run one engine step so that a request whose values break the batched forward fails alone.

`run_isolated(runner, sched)` executes the step as usual. If the runner raises, the step's requests are split
in halves and each half is executed on its own, recursively, until every request has either run (its results
kept) or failed alone (its exception kept). One culprit among B requests costs about 2·log2(B) extra
forwards of ever smaller batches; this path is for faults, never for the common case.

Why a retry gives the same tokens as a clean run:
  * the scheduler's state is untouched until `update()`, which runs once, after isolation;
  * KV writes are idempotent: a retried chunk writes the same values to the same slots (only positions >=
    `num_computed_tokens`, never a shared prefix-cache block);
  * media already encoded by a failed attempt are kept by content hash and not encoded again; freeing is
    idempotent;
  * the one piece of per-sequence state a forward advances is the seeded RNG: every generator is restored
    to its state before the step ahead of each attempt.
Unseeded rows draw from the global RNG, which is not reproducible across batches anyway.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

from plm_serve.engine.model_runner import RunnerOutput
from plm_serve.engine.request import MMInput
from plm_serve.engine.scheduler import ScheduledChunk, SchedulerOutput
from plm_serve.engine.sequence import Sequence

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class IsolatedStep:
    results: RunnerOutput  # of every chunk that ran, merged over the attempts
    failed: dict[str, Exception]  # request id -> what its own chunks raised when run alone
    # Set when nothing ran at all: the failure cannot be pinned on any one request (a broken device, a bug),
    # so it counts towards the engine's consecutive-failures breaker.
    unattributed: Exception | None = None
    ran: bool = False  # at least one execution succeeded


Execute = Callable[[SchedulerOutput], RunnerOutput]


def run_isolated(execute: Execute, sched: SchedulerOutput) -> IsolatedStep:
    """`execute(sched)`, or on failure the bisection described in the module docstring."""
    rng = _RngSnapshot([c.seq for c in sched.chunks])
    try:
        out = execute(sched)
    except Exception as exc:
        groups = _by_request(sched.chunks)
        logger.exception(
            "engine step failed (%d requests); isolating the culprit: %s", len(groups), type(exc).__name__
        )
        step = IsolatedStep(RunnerOutput({}, {}), {})
        if len(groups) == 1 or not sched.chunks:
            _fail(step, groups, exc)
        else:
            mid = len(groups) // 2
            _bisect(execute, sched, groups[:mid], rng, step)
            _bisect(execute, sched, groups[mid:], rng, step)
        if not step.ran:
            step.unattributed = exc  # every request failed, even alone: nobody in particular is to blame
        return step
    return IsolatedStep(out, {}, ran=True)


def _bisect(
    execute: Execute,
    sched: SchedulerOutput,
    groups: list[list[ScheduledChunk]],
    rng: _RngSnapshot,
    step: IsolatedStep,
) -> None:
    chunks = [c for g in groups for c in g]
    rng.restore([c.seq for c in chunks])
    try:
        out = execute(_subset(sched, chunks))
    except Exception as exc:
        if len(groups) == 1:
            _fail(step, groups, exc)
            return
        mid = len(groups) // 2
        _bisect(execute, sched, groups[:mid], rng, step)
        _bisect(execute, sched, groups[mid:], rng, step)
        return
    _merge(step, out)


def _fail(step: IsolatedStep, groups: list[list[ScheduledChunk]], exc: Exception) -> None:
    for group in groups:
        request_id = group[0].seq.request_id
        logger.warning(
            "request %s failed alone in an engine step: %s: %s", request_id, type(exc).__name__, exc
        )
        step.failed[request_id] = exc


def _by_request(chunks: list[ScheduledChunk]) -> list[list[ScheduledChunk]]:
    """Chunks grouped by request (the choices of a request share their sampling values, and fail together)."""
    groups: dict[str, list[ScheduledChunk]] = {}
    for c in chunks:
        groups.setdefault(c.seq.request_id, []).append(c)
    return list(groups.values())


def _subset(sched: SchedulerOutput, chunks: list[ScheduledChunk]) -> SchedulerOutput:
    """The step restricted to `chunks`, with the media they reference (already-encoded ones are skipped)."""
    hashes = {m.content_hash for c in chunks for m in c.seq.mm_inputs}
    encoder_inputs: list[MMInput] = [m for m in sched.encoder_inputs if m.content_hash in hashes]
    return SchedulerOutput(
        chunks=chunks,
        encoder_inputs=encoder_inputs,
        freed_encoder_hashes=sched.freed_encoder_hashes,  # idempotent
        preempted=sched.preempted,
        num_batched_tokens=sum(c.num_tokens for c in chunks),
    )


def _merge(step: IsolatedStep, out: RunnerOutput) -> None:
    step.ran = True
    acc = step.results
    acc.sampled.update(out.sampled)
    acc.logprobs.update(out.logprobs)
    acc.num_encoded_tiles += out.num_encoded_tiles
    acc.prompt_logprobs.update(out.prompt_logprobs)


class _RngSnapshot:
    """The seeded generators of a step's sequences as they were before it (None: not created yet)."""

    def __init__(self, seqs: list[Sequence]) -> None:
        self.states: dict[int, torch.Tensor | None] = {
            s.seq_id: s.generator.get_state() if s.generator is not None else None for s in seqs
        }

    def restore(self, seqs: list[Sequence]) -> None:
        for seq in seqs:
            state = self.states.get(seq.seq_id)
            if state is None:
                seq.generator = None  # the sampler seeds it afresh, exactly as in the first attempt
            elif seq.generator is not None:
                seq.generator.set_state(state)
