"""Token-budget continuous batching (vLLM style): no prefill/decode phases, only tokens to compute.

Public API:
    sched = Scheduler(config, num_blocks, eos_token_ids)
    sched.add_request(req) -> list[Sequence]   # validates: RequestRejectedError / EngineOverloadedError
    out = sched.schedule() -> SchedulerOutput  # what to run this step (engine/scheduler_output.py)
    ... the runner executes `out` and samples one token per chunk with `sample=True` ...
    got = sched.update(out, {seq_id: token_id})  # append, stop checks, free finished; -> sequences with a token
    sched.finish(seq, FinishReason.STOP)       # the core found a stop string
    sched.abort_request(request_id) -> list[Sequence]  # idempotent
    sched.roll_back(seq_ids, encoded_hashes) -> list[str]  # steps lost to a fault: recompute, suspect
    sched.sequence(seq_id), has_unfinished(), has_suspects, num_running, num_waiting, stats(), check_integrity()

`schedule()` advances each scheduled sequence at once (its computed tokens, and a placeholder for the token
a sampling chunk will produce), so the next `schedule()` may run before this step's tokens are back: the
overlapped loop schedules step N+1 while step N runs, and `update(N)` later fills the placeholders. The runner
sees only the data records of `SchedulerOutput` (see scheduler_output.py for that contract): a sequence's
data once when it takes a slot, then per-step chunks with the blocks appended to its table.

Policy per step: running sequences first, oldest first (a decode needs 1 token; a running prefill
continues with a chunk; every pending decode keeps 1 token reserved so a long prefill cannot starve
decodes), then waiting ones FCFS, within `max_num_batched_tokens` and `max_num_seqs`. While sequences are
decoding, prefill chunks together take at most `max_prefill_tokens_per_decode_step` tokens, so an arriving
long (image) prompt is spread over several steps instead of stalling every stream for one long step. When KV
blocks run out for a running sequence, the newest running sequence is preempted (recompute) and requeued at
the front; nothing new is admitted in a step that preempted. n > 1: choices 1..n-1 are held back until
choice 0's prompt prefill is done, then queued at the front so their prompt hits the prefix cache (sharing the
prompt's full blocks). A sequence whose in-flight token will end it by length, or whose grammar must see that
token first, is not scheduled until the token is back.

Media: with an asynchronous encoder (`encode_ahead`, set by the engine when the runner encodes on its own
CUDA stream) a chunk stops before an image whose encoding was scheduled this step or is still running
(`media_ready`), and continues once it is done: the step's decodes never wait for the vision tower.
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from plm_serve.engine.block_manager import BlockManager
from plm_serve.engine.config import EngineConfig
from plm_serve.engine.encoder_cache import EncoderBudget, EncoderCache, MediaPlan, plan_media
from plm_serve.engine.errors import EngineOverloadedError, RequestRejectedError
from plm_serve.engine.prompt_logprobs import needs_prompt_logprobs, prompt_scoring
from plm_serve.engine.request import EngineRequest, FinishReason, MMInput
from plm_serve.engine.scheduler_output import MediaSlice, NewSequence, ScheduledChunk, SchedulerOutput
from plm_serve.engine.sequence import Sequence, SequenceStatus
from plm_serve.engine.stats import SchedulerStats

_RUNNING = SequenceStatus.RUNNING


@dataclass(slots=True)
class _Step:
    """Budgets and results accumulated while building one SchedulerOutput."""

    tokens_left: int
    prefill_left: int  # prefill tokens still allowed (bounded while decodes run)
    encoder: EncoderBudget
    now: float
    chunks: list[ScheduledChunk] = field(default_factory=list)
    new_sequences: list[NewSequence] = field(default_factory=list)
    encoder_inputs: list[MMInput] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)
    media_users: list[Sequence] = field(default_factory=list)  # scheduled sequences holding encoder refs


class Scheduler:
    """Owns the queues, the block manager and the encoder cache. Single-threaded (the engine loop)."""

    def __init__(self, config: EngineConfig, num_blocks: int, eos_token_ids: Iterable[int]) -> None:
        self.config = config
        if config.max_model_len is None:
            raise ValueError(
                "the scheduler needs max_model_len resolved against the model (EngineCore does it)"
            )
        self.max_model_len = config.max_model_len
        self.eos_token_ids = frozenset(eos_token_ids)
        self.block_manager = BlockManager(num_blocks, config.block_size, config.enable_prefix_caching)
        self.encoder_cache = EncoderCache(config.encoder_cache_tokens)
        self.waiting: deque[Sequence] = deque()  # FCFS; preempted and released children go to the front
        self.running: list[Sequence] = []  # admission order: oldest first, preemption victims from the end
        self._held: dict[str, list[Sequence]] = {}  # n>1 children waiting for choice 0's prompt prefill
        self._requests: dict[str, list[Sequence]] = {}  # unfinished request id -> all its sequences
        self._live: dict[int, Sequence] = {}  # seq id -> unfinished sequence
        self._free_slots = list(range(config.max_num_seqs - 1, -1, -1))  # runner state rows; pop() -> lowest
        self._seq_ids = itertools.count()
        # Fault isolation (see `roll_back`): requests in a failed step, oldest first; a suspect runs alone.
        self._suspects: dict[str, None] = {}
        self.num_preemptions = 0
        # Set by the engine when the runner encodes media asynchronously (see the module docstring).
        self.encode_ahead = False
        self.media_ready: Callable[[str], bool] | None = None

    # ------------------------------------------------------------------------------------------------ intake

    def add_request(self, req: EngineRequest) -> list[Sequence]:
        """Queue a request as `sampling.n` sequences (choice 0 first). Raises RequestRejectedError if
        it can never be served, EngineOverloadedError if the waiting queue is full."""
        self._validate(req)
        if len(self.waiting) >= self.config.max_waiting_requests:
            raise EngineOverloadedError(
                f"the waiting queue is full ({self.config.max_waiting_requests} sequences); retry later"
            )
        seqs = [self._new_sequence(req, index) for index in range(req.sampling.n)]
        self._requests[req.request_id] = seqs
        self.waiting.append(seqs[0])
        if len(seqs) > 1:
            if self.config.enable_prefix_caching:
                self._held[req.request_id] = seqs[1:]
            else:  # nothing to share: no reason to wait
                self.waiting.extend(seqs[1:])
        return seqs

    def _new_sequence(self, req: EngineRequest, index: int) -> Sequence:
        seq = Sequence(
            seq_id=next(self._seq_ids),
            request_id=req.request_id,
            index=index,
            token_ids=list(req.prompt_token_ids),
            num_prompt_tokens=len(req.prompt_token_ids),
            sampling=req.sampling,
            mm_inputs=req.mm_inputs,
            arrival_time=req.arrival_time,
            cache_salt=req.cache_salt,
        )
        self._live[seq.seq_id] = seq
        return seq

    def sequence(self, seq_id: int) -> Sequence | None:
        """The unfinished sequence with this id, or None (finished, aborted or unknown)."""
        return self._live.get(seq_id)

    def _validate(self, req: EngineRequest) -> None:
        num_prompt = len(req.prompt_token_ids)
        if num_prompt == 0:
            raise RequestRejectedError("the prompt is empty")
        if req.request_id in self._requests:
            raise RequestRejectedError(f"request id {req.request_id!r} is already in use")
        max_tokens = req.sampling.max_tokens
        total = num_prompt + (max_tokens or 1)
        if total > self.max_model_len:
            raise RequestRejectedError(
                f"prompt ({num_prompt} tokens) + max_tokens ({max_tokens or 1}) = {total} exceeds the "
                f"context length {self.max_model_len}; shorten the prompt or lower max_tokens"
            )
        longest = min(num_prompt + max_tokens, self.max_model_len) if max_tokens else self.max_model_len
        needed = self.block_manager.blocks_needed(longest)
        if needed > self.block_manager.num_blocks:
            raise RequestRejectedError(
                f"a sequence of up to {longest} tokens needs {needed} KV blocks but the cache has only "
                f"{self.block_manager.num_blocks}; lower max_tokens"
            )
        self._validate_media(req.mm_inputs, num_prompt)

    def _validate_media(self, items: list[MMInput], num_prompt: int) -> None:
        prev_end = 0
        for i, item in enumerate(items):
            where = f"media item {i} ({item.kind}, placeholders [{item.offset}, {item.offset + item.length}))"
            if item.length < 1 or item.num_tiles < 1:
                raise RequestRejectedError(f"{where} is empty")
            if item.offset < prev_end or item.offset + item.length > num_prompt:
                raise RequestRejectedError(f"{where} overlaps another, is out of order or out of the prompt")
            if item.length > self.encoder_cache.capacity:
                raise RequestRejectedError(
                    f"{where} has {item.length} embeddings, more than the encoder cache holds "
                    f"({self.encoder_cache.capacity}); use fewer tiles or frames"
                )
            prev_end = item.offset + item.length

    # ---------------------------------------------------------------------------------------- schedule

    def schedule(self) -> SchedulerOutput:
        """Pick the chunks of this step and advance their sequences (see the module docstring).

        While requests are suspected of a fault (`roll_back`), the oldest of them runs alone in the step, and
        when it has nothing to do yet (no blocks, say), the step runs everyone else instead. An isolated step
        that only starts the suspect's encodings is returned as it is: those must reach the runner."""
        if self._suspects:
            out = self._schedule(next(iter(self._suspects)))
            if out.has_work:
                return out
        return self._schedule(None)

    def _schedule(self, only: str | None) -> SchedulerOutput:
        """One step; `only`: the request to run alone, or None for every request but the suspects."""
        decoding = any(self._is_decode(s) for s in self.running)
        cap = self.config.max_prefill_tokens_per_decode_step
        step = _Step(
            tokens_left=self.config.max_num_batched_tokens,
            prefill_left=cap if decoding and cap is not None else self.config.max_num_batched_tokens,
            encoder=EncoderBudget(self.config.max_encoder_tiles_per_step),
            now=time.monotonic(),
        )
        self._schedule_running(step, only)
        if not step.preempted:  # admitting now would just thrash with what was preempted
            self._schedule_waiting(step, only)
        for seq in step.media_users:  # after every chunk is built, so no entry this step uses is evicted
            self._release_passed_media(seq)
        return SchedulerOutput(
            chunks=step.chunks,
            new_sequences=step.new_sequences,
            encoder_inputs=step.encoder_inputs,
            freed_encoder_hashes=self.encoder_cache.take_freed(),
            preempted=[s.seq_id for s in step.preempted],
            num_batched_tokens=self.config.max_num_batched_tokens - step.tokens_left,
            isolated=only,
        )

    def _is_decode(self, seq: Sequence) -> bool:
        return seq.num_tokens - seq.num_computed_tokens == 1 and not self._waits_for_token(seq)

    def _waits_for_token(self, seq: Sequence) -> bool:
        """Nothing is to be scheduled for `seq` until its token in flight is back: that token ends it by length,
        or its grammar must consume it before the next step's mask exists (structured outputs; such a sequence
        decodes every other step of the overlapped loop, and everyone else keeps the overlap)."""
        if not seq.num_placeholders:
            return False
        if seq.grammar is not None:
            return True
        max_tokens = seq.sampling.max_tokens
        num_out = seq.num_tokens - seq.num_prompt_tokens
        return (max_tokens is not None and num_out >= max_tokens) or seq.num_tokens >= self.max_model_len

    def _runs(self, seq: Sequence, only: str | None) -> bool:
        """Whether `seq` takes part in a step that runs `only` alone (or, with None, everyone unsuspected)."""
        return seq.request_id == only if only is not None else seq.request_id not in self._suspects

    def _schedule_running(self, step: _Step, only: str | None = None) -> None:
        running = self.running  # preemption shrinks it (from the end) while we iterate
        i = 0
        while i < len(running):
            seq = running[i]
            if not self._runs(seq, only):
                i += 1
                continue
            remaining = seq.num_tokens - seq.num_computed_tokens
            if self._waits_for_token(seq):
                num_new = 0
            elif remaining == 1:  # a decode
                num_new = 1 if step.tokens_left > 0 else 0
            else:  # a prefill chunk leaves one token to every decode after it
                num_new = min(remaining, step.tokens_left - self._pending_decodes(i + 1), step.prefill_left)
            if num_new > 0:
                self._schedule_running_chunk(seq, num_new, step)
            i += 1

    def _pending_decodes(self, start: int) -> int:
        return sum(1 for s in self.running[start:] if self._is_decode(s))

    def _schedule_running_chunk(self, seq: Sequence, num_new: int, step: _Step) -> None:
        plan = None
        if seq.mm_inputs:
            plan = self._plan_media(seq, seq.num_computed_tokens, num_new, step, self.encode_ahead)
            num_new = plan.num_tokens
            if num_new == 0 and (plan.encode or plan.refs):  # waits for its media: start their encoding now
                self._take_media(seq, plan, step)
                return
        if num_new > 0:
            num_blocks = len(seq.block_table)
            if self._allocate_or_preempt(seq, num_new, step):
                self._commit(seq, num_new, plan, step, seq.block_table[num_blocks:])

    def _plan_media(self, seq: Sequence, start: int, num_new: int, step: _Step, ahead: bool) -> MediaPlan:
        ready = self.media_ready if self.encode_ahead else None
        return plan_media(self.encoder_cache, seq.mm_inputs, start, num_new, step.encoder, ready, ahead)

    def _allocate_or_preempt(self, seq: Sequence, num_new: int, step: _Step) -> bool:
        """Allocate for `seq`, preempting the newest running sequences (maybe `seq`) until it fits."""
        while not self.block_manager.allocate(seq, num_new):
            victim = self.running[-1]  # never one scheduled earlier in this step: those are older
            self._preempt(victim)
            step.preempted.append(victim)
            if victim is seq:
                return False
        return True

    def _schedule_waiting(self, step: _Step, only: str | None = None) -> None:
        if only is not None or self._suspects:  # skip whoever does not run in this step
            for seq in [s for s in self.waiting if self._runs(s, only)]:
                full = len(self.running) >= self.config.max_num_seqs
                if step.tokens_left <= 0 or step.prefill_left <= 0 or full:
                    return
                if not self._admit(seq, step):
                    return
                self.waiting.remove(seq)
            return
        while (
            self.waiting
            and step.tokens_left > 0
            and step.prefill_left > 0
            and len(self.running) < self.config.max_num_seqs
        ):
            if not self._admit(self.waiting[0], step):
                break  # strict FCFS: the head waits for blocks or encoder budget, nobody overtakes it
            self.waiting.popleft()

    def _admit(self, seq: Sequence, step: _Step) -> bool:
        assert seq.num_placeholders == 0, "admitted with a token still in flight"
        # A prompt being scored (prompt logprobs) is computed in full: cached positions would have no logits.
        cached = 0 if needs_prompt_logprobs(seq) else self.block_manager.match_prefix(seq)
        num_new = min(seq.num_tokens - cached, step.tokens_left, step.prefill_left)
        plan = None
        if seq.mm_inputs:
            plan = self._plan_media(seq, cached, num_new, step, self.encode_ahead)
            if plan.num_tokens == 0 and self.encode_ahead:
                # Nothing before its media to prefill: consume them in this step rather than wait outside.
                plan = self._plan_media(seq, cached, num_new, step, ahead=False)
            num_new = plan.num_tokens
        if num_new == 0 or not self.block_manager.allocate(seq, num_new, cached):
            return False
        seq.status = _RUNNING
        seq.slot = self._free_slots.pop()
        seq.num_computed_tokens = seq.num_cached_tokens = cached
        if seq.first_scheduled_time is None:
            seq.first_scheduled_time = step.now
        self.running.append(seq)
        step.new_sequences.append(
            NewSequence(
                seq_id=seq.seq_id,
                slot=seq.slot,
                token_ids=list(seq.token_ids),
                num_prompt_tokens=seq.num_prompt_tokens,
                sampling=seq.sampling,
                index=seq.index,
                block_ids=list(seq.block_table),
            )
        )
        self._commit(seq, num_new, plan, step, [])
        return True

    def _commit(
        self, seq: Sequence, num_new: int, plan: MediaPlan | None, step: _Step, new_blocks: list[int]
    ) -> None:
        """Take the media of `plan`, emit the chunk (its blocks are already allocated) and advance `seq`."""
        if plan is not None:
            self._take_media(seq, plan, step)
        start = seq.num_computed_tokens
        sample = start + num_new == seq.num_tokens
        if num_new != 1 or not sample:
            step.prefill_left -= num_new
        step.tokens_left -= num_new
        media = _media_slices(seq, start, num_new) if seq.mm_inputs else []
        scoring = prompt_scoring(seq, start, num_new) if seq.sampling.prompt_logprobs is not None else None
        step.chunks.append(
            ScheduledChunk(seq.seq_id, seq.slot, start, num_new, sample, new_blocks, media, scoring)
        )
        seq.num_computed_tokens = start + num_new
        if sample:
            seq.num_placeholders += 1

    def _take_media(self, seq: Sequence, plan: MediaPlan, step: _Step) -> None:
        cache, owner = self.encoder_cache, seq.seq_id
        for h in plan.refs:  # references first: a referenced entry cannot be evicted by allocations
            cache.add_ref(h, owner)
            seq.encoder_refs.add(h)
        for item in plan.encode:
            cache.allocate(item.content_hash, item.length, owner)
            seq.encoder_refs.add(item.content_hash)
            step.encoder_inputs.append(item)
        if plan.encode:
            step.encoder.spend(plan.tiles, len(plan.encode))
        if seq.encoder_refs:
            step.media_users.append(seq)

    # -------------------------------------------------------------------------------------- fault isolation

    def roll_back(self, seq_ids: Iterable[int], encoded: Iterable[str]) -> list[str]:
        """After a step failed: undo what the lost steps did to `seq_ids` and suspect their requests.

        The tokens of the failed steps never arrive: each sequence drops its placeholders and is preempted
        (recompute, which gives the same tokens: greedy and the seeded sampler's keys depend only on the
        sequence), and the prefix cache forgets the blocks only it held (the lost steps may not have written
        them). Encoder entries the lost steps were to make (`encoded`) are dropped, and so is every sequence
        that references one (it may be waiting for that encoding, outside the lost steps). Each request is then
        suspected and runs alone until it gets a token (`update`), so the next failure is attributed to one
        request. Returns the suspected request ids."""
        void = set(encoded)
        seqs = [self._live[i] for i in dict.fromkeys(seq_ids) if i in self._live]
        if void:
            seqs += [s for s in self.running if s.encoder_refs & void and s not in seqs]
        requests: dict[str, None] = {}
        requeued = []
        for seq in seqs:
            seq.num_placeholders = 0
            if seq.status is _RUNNING:
                self.running.remove(seq)
                self._release_resources(seq, uncache=True)
                seq.status = SequenceStatus.WAITING
                seq.num_computed_tokens = 0
                requeued.append(seq)
            requests[seq.request_id] = None
        self.waiting.extendleft(reversed(requeued))  # at the front, in their order
        for content_hash in void:
            self.encoder_cache.discard(content_hash)
        self._suspects.update(requests)
        return list(requests)

    @property
    def has_suspects(self) -> bool:
        return bool(self._suspects)

    def _preempt(self, seq: Sequence) -> None:
        """Recompute preemption: drop the KV and the slot, keep the tokens, requeue at the front."""
        self.running.remove(seq)
        self._release_resources(seq)
        seq.status = SequenceStatus.WAITING
        seq.num_computed_tokens = 0
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    # ------------------------------------------------------------------------------------------ update

    def update(self, output: SchedulerOutput, sampled: dict[int, int]) -> list[Sequence]:
        """Apply a finished step: put `sampled[seq_id]` in place of the placeholder of every chunk with
        `sample=True`, register newly full blocks, and finish sequences that stop (EOS unless ignore_eos,
        stop_token_ids, never before min_tokens; max_tokens; the context length).

        Returns the sequences that received a token, in chunk order (finished ones already freed). A sequence
        finished or aborted since `schedule()` is skipped; one preempted since then still gets its token (it was
        computed before its blocks were reused: the device runs steps in order).
        """
        got: list[Sequence] = []
        now = time.monotonic()
        for chunk in output.chunks:
            seq = self._live.get(chunk.seq_id)
            if seq is None:  # finished or aborted since schedule()
                continue
            if chunk.sample:
                assert seq.num_placeholders > 0, "update() applied twice or out of order"
                seq.num_placeholders -= 1
                self._append_token(seq, sampled[seq.seq_id], now)
            if seq.status is _RUNNING:
                # Positions computed by a step still in flight may be registered: whoever reads a cached block
                # runs after that step on the device. Their tokens must be known, though (they are hashed).
                assert seq.num_computed_tokens <= len(seq.token_ids), "hashing a token still in flight"
                self.block_manager.cache_full_blocks(seq)
            if not chunk.sample:
                continue
            got.append(seq)
            reason = self._stop_reason(seq)
            if reason is not None:
                self._finish(seq, reason, now)
        if output.isolated is not None and got:  # it ran alone and got its token: not the culprit
            self._suspects.pop(output.isolated, None)
        return got

    def _append_token(self, seq: Sequence, token_id: int, now: float) -> None:
        seq.token_ids.append(token_id)
        if seq.first_token_time is None:
            seq.first_token_time = now
            children = self._held.pop(seq.request_id, None) if seq.index == 0 else None
            if children:  # the prompt's full blocks are cached now: the other choices share them
                self.waiting.extendleft(reversed(children))

    def _stop_reason(self, seq: Sequence) -> FinishReason | None:
        sp = seq.sampling
        token = seq.token_ids[-1]
        num_tokens = len(seq.token_ids)  # known tokens: this check runs as each one arrives
        num_out = num_tokens - seq.num_prompt_tokens
        # Stop tokens count only once min_tokens tokens came before (the sampler masks them until then).
        if num_out > sp.min_tokens and (
            token in sp.stop_token_ids or (not sp.ignore_eos and token in self.eos_token_ids)
        ):
            seq.stop_token_id = token
            return FinishReason.STOP
        if (sp.max_tokens is not None and num_out >= sp.max_tokens) or num_tokens >= self.max_model_len:
            return FinishReason.LENGTH
        return None

    def _release_passed_media(self, seq: Sequence) -> None:
        done = seq.num_computed_tokens
        needed = {m.content_hash for m in seq.mm_inputs if m.offset + m.length > done}
        for h in [h for h in seq.encoder_refs if h not in needed]:
            self.encoder_cache.release(h, seq.seq_id)
            seq.encoder_refs.discard(h)

    # ---------------------------------------------------------------------------------- finish / abort

    def finish(self, seq: Sequence, reason: FinishReason) -> None:
        """Finish `seq` now (e.g. the detokenizer matched a stop string); idempotent."""
        self._finish(seq, reason, time.monotonic())

    def abort_request(self, request_id: str) -> list[Sequence]:
        """Finish every unfinished sequence of the request with ABORT and free everything; idempotent.
        Returns the sequences aborted by this call."""
        seqs = [s for s in self._requests.get(request_id, ()) if s.status is not SequenceStatus.FINISHED]
        now = time.monotonic()
        for seq in seqs:
            self._finish(seq, FinishReason.ABORT, now)
        return seqs

    def _finish(self, seq: Sequence, reason: FinishReason, now: float) -> None:
        if seq.status is SequenceStatus.FINISHED:
            return
        if seq.status is _RUNNING:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        else:  # a held-back child
            self._held[seq.request_id].remove(seq)
        self._release_resources(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        seq.finished_time = now
        del self._live[seq.seq_id]
        self._forget_if_done(seq.request_id)

    def _release_resources(self, seq: Sequence, uncache: bool = False) -> None:
        self.block_manager.free(seq, uncache=uncache)
        for h in seq.encoder_refs:
            self.encoder_cache.release(h, seq.seq_id)
        seq.encoder_refs.clear()
        if seq.slot >= 0:
            self._free_slots.append(seq.slot)
            seq.slot = -1

    def _forget_if_done(self, request_id: str) -> None:
        seqs = self._requests.get(request_id)
        if seqs is not None and all(s.status is SequenceStatus.FINISHED for s in seqs):
            del self._requests[request_id]
            self._held.pop(request_id, None)
            self._suspects.pop(request_id, None)

    # -------------------------------------------------------------------------------------- inspection

    def has_unfinished(self) -> bool:
        return bool(self._requests)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        """Queued sequences, including n>1 children held back."""
        return len(self.waiting) + sum(len(c) for c in self._held.values())

    def stats(self) -> SchedulerStats:
        bm, ec = self.block_manager, self.encoder_cache
        return SchedulerStats(
            num_running=self.num_running,
            num_waiting=self.num_waiting,
            kv_usage=bm.usage,
            num_free_blocks=bm.num_free_blocks,
            num_total_blocks=bm.num_blocks,
            prefix_cache_queries=bm.queries,
            prefix_cache_hits=bm.hits,
            encoder_cache_hits=ec.hits,
            encoder_cache_misses=ec.misses,
            encoder_cache_entries=len(ec),
            num_preemptions=self.num_preemptions,
        )

    def check_integrity(self) -> None:
        """Raise AssertionError on leaked or inconsistent blocks / encoder references (O(pool))."""
        queued = [*self.waiting, *itertools.chain.from_iterable(self._held.values())]
        for seq in queued:
            assert seq.status is SequenceStatus.WAITING, f"{seq} queued but not WAITING"
            assert not seq.block_table and not seq.encoder_refs, f"{seq} holds resources while queued"
        slots = sorted(s.slot for s in self.running)
        assert slots == sorted(set(slots)) and all(s >= 0 for s in slots), "running sequences share slots"
        assert sorted(slots + self._free_slots) == list(range(self.config.max_num_seqs)), "a slot leaked"
        for seq in self.running:
            assert seq.status is _RUNNING, f"{seq} in the running list but not RUNNING"
            covered = len(seq.block_table) * self.config.block_size
            assert covered >= seq.num_computed_tokens, f"{seq}: block table too short"
            for h in seq.encoder_refs:
                assert self.encoder_cache.is_owner(h, seq.seq_id), f"{seq}: lost encoder ref {h[:12]}"
        self.block_manager.check_integrity(self.running)
        self.encoder_cache.check_integrity({s.seq_id for s in self.running})
        if not self.has_unfinished():
            assert not queued and not self.running and not self._held, "idle but sequences are queued"
            assert self.block_manager.num_used_blocks == 0, "idle but KV blocks are still in use (leak)"


def _media_slices(seq: Sequence, start: int, num_tokens: int) -> list[MediaSlice]:
    """Which encoder-output rows fill which positions of chunk [start, start + num_tokens)."""
    out = []
    end = start + num_tokens
    for item in seq.mm_inputs:
        lo, hi = max(start, item.offset), min(end, item.offset + item.length)
        if lo < hi:
            out.append(MediaSlice(item.content_hash, lo - start, lo - item.offset, hi - lo))
    return out
