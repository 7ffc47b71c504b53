"""Token-budget continuous batching (vLLM style): no prefill/decode phases, only tokens to compute.

Public API:
    sched = Scheduler(config, num_blocks, eos_token_ids)
    sched.add_request(req) -> list[Sequence]   # validates: RequestRejectedError / EngineOverloadedError
    out = sched.schedule() -> SchedulerOutput  # what to run this step
    ... the runner executes `out` and samples one token per chunk with `sample=True` ...
    finished = sched.update(out, {seq_id: token_id})  # advance, append, stop checks, free finished
    sched.finish(seq, FinishReason.STOP)       # the core found a stop string
    sched.abort_request(request_id) -> list[Sequence]  # idempotent
    sched.has_unfinished(), num_running, num_waiting, stats(), check_integrity()

Contract with the model runner, for each `ScheduledChunk(seq, start, num_tokens, sample)`:
  * input tokens are `seq.token_ids[start : start + num_tokens]`; token j is at position `start + j`
    and writes its KV to slot `block_table[pos // block_size] * block_size + pos % block_size`;
    attention covers positions `[0, start + num_tokens)` of the sequence (the first `start` are
    already in the KV cache).
  * `sample=True`: after this chunk every token of `seq.token_ids` is computed: sample the next token
    from the logits of the chunk's last token and return it as `sampled[seq.seq_id]`.
    `sample=False`: an intermediate prefill chunk, no logits needed.
  * media: `chunk.media_slices()` says which embedding rows of which item fill which chunk positions.
    First drop the tensors of `out.freed_encoder_hashes`, then encode `out.encoder_inputs` (unique
    hashes) and keep each output by `content_hash` until a later step lists the hash as freed.
  * `out.preempted`: sequences that lost their KV (drop any per-sequence runner state); they come
    back later as prefills of prompt + outputs so far, and their output is unchanged.

Policy per step: running sequences first, oldest first (a decode needs 1 token; a running prefill
continues with a chunk; every pending decode keeps 1 token reserved so a long prefill cannot starve
decodes), then waiting ones FCFS, within `max_num_batched_tokens` and `max_num_seqs`. When KV blocks
run out for a running sequence, the newest running sequence is preempted (recompute) and requeued at
the front; nothing new is admitted in a step that preempted. n > 1: choices 1..n-1 are held back
until choice 0's prompt prefill is done, then queued at the front so their prompt hits the prefix
cache (sharing the prompt's full blocks).
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

from plm_serve.engine.block_manager import BlockManager
from plm_serve.engine.config import EngineConfig
from plm_serve.engine.encoder_cache import EncoderBudget, EncoderCache, MediaPlan, plan_media
from plm_serve.engine.errors import EngineOverloadedError, RequestRejectedError
from plm_serve.engine.prompt_logprobs import needs_prompt_logprobs
from plm_serve.engine.request import EngineRequest, FinishReason, MMInput
from plm_serve.engine.sequence import Sequence, SequenceStatus
from plm_serve.engine.stats import SchedulerStats

_RUNNING = SequenceStatus.RUNNING


@dataclass(slots=True)
class ScheduledChunk:
    """Compute `seq.token_ids[start : start + num_tokens]`; if `sample`, then sample the next token."""

    seq: Sequence
    start: int
    num_tokens: int
    sample: bool

    @property
    def end(self) -> int:
        return self.start + self.num_tokens

    @property
    def token_ids(self) -> list[int]:
        return self.seq.token_ids[self.start : self.start + self.num_tokens]

    def media_slices(self) -> list[tuple[MMInput, int, int, int]]:
        """`(item, chunk_pos, row, num_rows)`: chunk positions `[chunk_pos, chunk_pos + num_rows)`
        (relative to `start`) take rows `[row, row + num_rows)` of the item's encoder output."""
        out = []
        for item in self.seq.mm_inputs:
            lo, hi = max(self.start, item.offset), min(self.end, item.offset + item.length)
            if lo < hi:
                out.append((item, lo - self.start, lo - item.offset, hi - lo))
        return out


@dataclass(slots=True)
class SchedulerOutput:
    chunks: list[ScheduledChunk]
    encoder_inputs: list[MMInput]  # to encode this step, deduplicated by content_hash
    freed_encoder_hashes: list[str]  # evicted from the encoder cache: drop these tensors (before encoding)
    preempted: list[Sequence]
    num_batched_tokens: int

    @property
    def is_empty(self) -> bool:
        return not self.chunks


@dataclass(slots=True)
class _Step:
    """Budgets and results accumulated while building one SchedulerOutput."""

    tokens_left: int
    encoder: EncoderBudget
    now: float
    chunks: list[ScheduledChunk] = field(default_factory=list)
    encoder_inputs: list[MMInput] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)


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
        self._seq_ids = itertools.count()
        self.num_preemptions = 0

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
        return Sequence(
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
        """Pick the chunks of this step (see the module docstring for the policy and the contract)."""
        step = _Step(
            tokens_left=self.config.max_num_batched_tokens,
            encoder=EncoderBudget(self.config.max_encoder_tiles_per_step),
            now=time.monotonic(),
        )
        self._schedule_running(step)
        if not step.preempted:  # admitting now would just thrash with what was preempted
            self._schedule_waiting(step)
        return SchedulerOutput(
            chunks=step.chunks,
            encoder_inputs=step.encoder_inputs,
            freed_encoder_hashes=self.encoder_cache.take_freed(),
            preempted=step.preempted,
            num_batched_tokens=self.config.max_num_batched_tokens - step.tokens_left,
        )

    def _schedule_running(self, step: _Step) -> None:
        running = self.running  # preemption shrinks it (from the end) while we iterate
        i = 0
        while i < len(running):
            seq = running[i]
            remaining = len(seq.token_ids) - seq.num_computed_tokens
            if remaining == 1:  # a decode
                num_new = 1 if step.tokens_left > 0 else 0
            else:  # a prefill chunk leaves one token to every decode after it
                num_new = min(remaining, step.tokens_left - self._pending_decodes(i + 1))
            if num_new > 0:
                self._schedule_running_chunk(seq, num_new, step)
            i += 1

    def _pending_decodes(self, start: int) -> int:
        return sum(1 for s in self.running[start:] if len(s.token_ids) - s.num_computed_tokens == 1)

    def _schedule_running_chunk(self, seq: Sequence, num_new: int, step: _Step) -> None:
        plan = None
        if seq.mm_inputs:
            plan = plan_media(
                self.encoder_cache, seq.mm_inputs, seq.num_computed_tokens, num_new, step.encoder
            )
            num_new = plan.num_tokens
        if num_new > 0 and self._allocate_or_preempt(seq, num_new, step):
            self._commit(seq, num_new, plan, step)

    def _allocate_or_preempt(self, seq: Sequence, num_new: int, step: _Step) -> bool:
        """Allocate for `seq`, preempting the newest running sequences (maybe `seq`) until it fits."""
        while not self.block_manager.allocate(seq, num_new):
            victim = self.running[-1]  # never one scheduled earlier in this step: those are older
            self._preempt(victim)
            step.preempted.append(victim)
            if victim is seq:
                return False
        return True

    def _schedule_waiting(self, step: _Step) -> None:
        while self.waiting and step.tokens_left > 0 and len(self.running) < self.config.max_num_seqs:
            if not self._admit(self.waiting[0], step):
                break  # strict FCFS: the head waits for blocks or encoder budget, nobody overtakes it
            self.waiting.popleft()

    def _admit(self, seq: Sequence, step: _Step) -> bool:
        # A prompt being scored (prompt logprobs) is computed in full: cached positions would have no logits.
        cached = 0 if needs_prompt_logprobs(seq) else self.block_manager.match_prefix(seq)
        num_new = min(seq.num_tokens - cached, step.tokens_left)
        plan = None
        if seq.mm_inputs:
            plan = plan_media(self.encoder_cache, seq.mm_inputs, cached, num_new, step.encoder)
            num_new = plan.num_tokens
        if num_new == 0 or not self.block_manager.allocate(seq, num_new, cached):
            return False
        seq.status = _RUNNING
        seq.num_computed_tokens = seq.num_cached_tokens = cached
        if seq.first_scheduled_time is None:
            seq.first_scheduled_time = step.now
        self.running.append(seq)
        self._commit(seq, num_new, plan, step)
        return True

    def _commit(self, seq: Sequence, num_new: int, plan: MediaPlan | None, step: _Step) -> None:
        """Take the media of `plan` and emit the chunk (its blocks are already allocated)."""
        if plan is not None:
            self._take_media(seq, plan, step)
        start = seq.num_computed_tokens
        step.tokens_left -= num_new
        step.chunks.append(ScheduledChunk(seq, start, num_new, start + num_new == len(seq.token_ids)))

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

    def _preempt(self, seq: Sequence) -> None:
        """Recompute preemption: drop the KV, keep the tokens, requeue at the front."""
        self.running.remove(seq)
        self._release_resources(seq)
        seq.status = SequenceStatus.WAITING
        seq.num_computed_tokens = 0
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    # ------------------------------------------------------------------------------------------ update

    def update(self, output: SchedulerOutput, sampled: dict[int, int]) -> list[Sequence]:
        """Apply a finished step: advance every chunk, append `sampled[seq_id]` for chunks with `sample=True`,
        register newly full blocks, release media the prefill has passed, and finish sequences that stop
        (EOS unless ignore_eos, stop_token_ids, never before min_tokens; max_tokens; the context length).
        Returns the sequences finished in this step (already freed)."""
        finished: list[Sequence] = []
        now = time.monotonic()
        for chunk in output.chunks:
            seq = chunk.seq
            if seq.status is not _RUNNING:  # finished or aborted since schedule()
                continue
            assert seq.num_computed_tokens == chunk.start, "update() applied twice or out of order"
            seq.num_computed_tokens = chunk.start + chunk.num_tokens
            self.block_manager.cache_full_blocks(seq)
            if seq.encoder_refs:
                self._release_passed_media(seq)
            if chunk.sample:
                self._append_token(seq, sampled[seq.seq_id], now)
                reason = self._stop_reason(seq)
                if reason is not None:
                    self._finish(seq, reason, now)
                    finished.append(seq)
        return finished

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
        num_tokens = len(seq.token_ids)
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
        self._forget_if_done(seq.request_id)

    def _release_resources(self, seq: Sequence) -> None:
        self.block_manager.free(seq)
        for h in seq.encoder_refs:
            self.encoder_cache.release(h, seq.seq_id)
        seq.encoder_refs.clear()

    def _forget_if_done(self, request_id: str) -> None:
        seqs = self._requests.get(request_id)
        if seqs is not None and all(s.status is SequenceStatus.FINISHED for s in seqs):
            del self._requests[request_id]
            self._held.pop(request_id, None)

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
