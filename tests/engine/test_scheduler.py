"""Scheduler, driven by a fake runner that follows the runner contract on a fake KV pool.

The fake runner sees only the records of `SchedulerOutput` (engine/scheduler_output.py), as the real one does:
it keeps each slot's tokens and block table from `NewSequence` and the chunks' diffs, writes each chunk's
(token, media row) into the slots given by the block table and, when a chunk samples, reads the whole context
back from those slots, as attention would, and checks it against the scheduler's own sequence: wrong block
sharing, a lost block or a wrong diff fails there. Its "model" is a deterministic function of the context, so
every run must produce the same tokens as `reference_output`, however it was scheduled or preempted.
`launch()` executes a step at once (in order, like a device stream) but its tokens come back only at `wait()`:
the overlapped loop (schedule N+1 before applying N) is tested with it against the synchronous one.
"""

from __future__ import annotations

import random

import pytest
import torch

from plm_serve.engine.config import EngineConfig
from plm_serve.engine.encoder_cache import EncoderCache
from plm_serve.engine.errors import EngineOverloadedError, RequestRejectedError
from plm_serve.engine.request import EngineRequest, FinishReason, MMInput, SamplingParams
from plm_serve.engine.scheduler import Scheduler
from plm_serve.engine.scheduler_output import MediaSlice, SchedulerOutput
from plm_serve.engine.sequence import SequenceStatus

BS = 4
EOS = 2
IMG = 128002


def config(**overrides) -> EngineConfig:
    base = dict(model="fake", block_size=BS, max_num_batched_tokens=64, max_num_seqs=8, max_model_len=4096)
    return EngineConfig(**{**base, **overrides})


def next_token(tokens: list[int]) -> int:
    """The fake model: a deterministic function of the whole context (never EOS)."""
    return 1000 + sum(t * (i + 1) for i, t in enumerate(tokens)) % 997


def reference_output(prompt: list[int], max_tokens: int) -> list[int]:
    tokens = list(prompt)
    for _ in range(max_tokens):
        tokens.append(next_token(tokens))
    return tokens[len(prompt) :]


def image(h: str, offset: int, length: int, tiles: int = 1) -> MMInput:
    return MMInput(h, torch.zeros(tiles, 3, 1, 1, dtype=torch.uint8), offset, length)


def request(rid: str, prompt: list[int], mm: list[MMInput] | None = None, **sampling) -> EngineRequest:
    sampling.setdefault("max_tokens", 4)
    return EngineRequest(rid, list(prompt), SamplingParams(**sampling), mm or [])


class FakeRunner:
    def __init__(self, sched: Scheduler, script: list[int] | None = None, ready_after: int = 0) -> None:
        self.sched = sched
        self.kv: dict[int, tuple[int, str | None, int]] = {}  # kv slot -> (token, media hash, media row)
        self.tables: dict[int, list[int]] = {}  # runner slot -> block table
        self.tokens: dict[int, list[int]] = {}  # runner slot -> tokens (known + sampled on the "device")
        self.media: dict[str, int] = {}  # encoder outputs held: hash -> launch count when encoded
        self.encoded: list[str] = []  # every encoding ever run
        self.script = script  # fixed sampled tokens instead of the fake model
        self.ready_after = ready_after  # launches before an encoding is ready (an asynchronous encoder)
        self.launches = 0
        self.names: dict[int, str] = {}  # seq id -> request id (for test assertions only)

    def media_ready(self, h: str) -> bool:
        return h in self.media and self.launches - self.media[h] >= self.ready_after

    def kv_slot(self, table: list[int], pos: int) -> int:
        bs = self.sched.config.block_size
        return table[pos // bs] * bs + pos % bs

    def shape(self, out: SchedulerOutput) -> list[tuple[str, int, int, bool]]:
        return [(self.names[c.seq_id], c.start, c.num_tokens, c.sample) for c in out.chunks]

    def launch(self, out: SchedulerOutput) -> dict[int, int]:
        """Run the step now (in order); the returned tokens are what `wait()` would deliver later."""
        self.launches += 1
        for h in out.freed_encoder_hashes:
            self.media.pop(h, None)
        for m in out.encoder_inputs:
            assert m.content_hash not in self.media, "encoded again while cached"
            self.media[m.content_hash] = self.launches
            self.encoded.append(m.content_hash)
        for new in out.new_sequences:
            self.tables[new.slot] = list(new.block_ids)
            self.tokens[new.slot] = list(new.token_ids)
        sampled = {}
        for c in out.chunks:
            seq = self.sched.sequence(c.seq_id)  # the oracle: used for checks only, never for running
            self.names[c.seq_id] = seq.request_id
            table = self.tables[c.slot]
            table.extend(c.new_block_ids)
            row = {}
            for m in c.media:
                assert self.media_ready(m.content_hash), (
                    "chunk needs media that is not encoded (or not ready)"
                )
                for j in range(m.num_rows):
                    row[c.start + m.chunk_pos + j] = (m.content_hash, m.row + j)
            for pos in range(c.start, c.end):
                self.kv[self.kv_slot(table, pos)] = (self.tokens[c.slot][pos], *row.get(pos, (None, 0)))
            if c.sample:
                context = [self.kv[self.kv_slot(table, pos)] for pos in range(c.end)]
                known = min(c.end, len(seq.token_ids))
                assert context[:known] == [content(seq, p) for p in range(known)], "KV corrupted"
                tokens = [t for t, _, _ in context]
                token = self.script.pop(0) if self.script else next_token(tokens)
                assert len(self.tokens[c.slot]) == c.end, "the sampled token's position"
                self.tokens[c.slot].append(token)
                sampled[c.seq_id] = token
        return sampled

    execute = launch  # the synchronous loop: launch and wait at once


def content(seq, pos: int) -> tuple[int, str | None, int]:
    for m in seq.mm_inputs:
        if m.offset <= pos < m.offset + m.length:
            return (seq.token_ids[pos], m.content_hash, pos - m.offset)
    return (seq.token_ids[pos], None, 0)


def check_step(sched: Scheduler, out: SchedulerOutput) -> None:
    cfg = sched.config
    assert out.num_batched_tokens == sum(c.num_tokens for c in out.chunks) <= cfg.max_num_batched_tokens
    assert len({c.seq_id for c in out.chunks}) == len(out.chunks) <= cfg.max_num_seqs
    assert len({m.content_hash for m in out.encoder_inputs}) == len(out.encoder_inputs)


def step(sched: Scheduler, runner: FakeRunner) -> SchedulerOutput:
    out = sched.schedule()
    check_step(sched, out)
    sched.update(out, runner.execute(out))
    sched.check_integrity()
    return out


def run(sched: Scheduler, runner: FakeRunner, max_steps: int = 2000) -> list[SchedulerOutput]:
    outs = []
    while sched.has_unfinished():
        outs.append(step(sched, runner))
        assert len(outs) < max_steps, "no progress"
    sched.check_integrity()
    return outs


def run_overlapped(sched: Scheduler, runner: FakeRunner, max_steps: int = 2000) -> list[SchedulerOutput]:
    """The overlapped loop: schedule and launch step N+1, then apply step N."""
    outs, in_flight = [], []
    while sched.has_unfinished() or in_flight:
        out = sched.schedule()
        check_step(sched, out)
        if out.has_work:
            in_flight.append((out, runner.launch(out)))
            outs.append(out)
        if in_flight and (len(in_flight) > 1 or not out.has_work):
            done, sampled = in_flight.pop(0)
            sched.update(done, sampled)
        sched.check_integrity()
        assert len(outs) < max_steps, "no progress"
    sched.check_integrity()
    return outs


# ------------------------------------------------------------------------------------------- basics


def test_chunked_prefill_then_decode() -> None:
    sched = Scheduler(config(max_num_batched_tokens=32), num_blocks=64, eos_token_ids={EOS})
    runner = FakeRunner(sched)
    prompt = list(range(10, 110))
    (seq,) = sched.add_request(request("a", prompt, max_tokens=3))
    outs = run(sched, runner)
    assert [runner.shape(o) for o in outs] == [
        [("a", 0, 32, False)],
        [("a", 32, 32, False)],
        [("a", 64, 32, False)],
        [("a", 96, 4, True)],
        [("a", 100, 1, True)],
        [("a", 101, 1, True)],
    ]
    assert seq.output_token_ids == reference_output(prompt, 3)
    assert seq.finish_reason is FinishReason.LENGTH and seq.status is SequenceStatus.FINISHED
    assert sched.block_manager.num_used_blocks == 0


def test_decode_and_prefill_share_a_step_and_requests_join_between_steps() -> None:
    sched = Scheduler(config(), num_blocks=64, eos_token_ids={EOS})
    runner = FakeRunner(sched)
    sched.add_request(request("a", list(range(10)), max_tokens=5))
    assert runner.shape(step(sched, runner)) == [("a", 0, 10, True)]
    sched.add_request(request("b", list(range(50, 70)), max_tokens=2))
    out = step(sched, runner)
    assert runner.shape(out) == [("a", 10, 1, True), ("b", 0, 20, True)]
    assert out.num_batched_tokens == 21
    run(sched, runner)


def test_budgets_respected_and_outputs_exact_under_load() -> None:
    rng = random.Random(0)
    sched = Scheduler(config(max_num_batched_tokens=48, max_num_seqs=4), num_blocks=200, eos_token_ids={EOS})
    runner = FakeRunner(sched)
    expected = {}
    seqs = {}
    for i in range(20):
        prompt = [rng.randrange(3, 500) for _ in range(rng.randrange(5, 80))]
        max_tokens = rng.randrange(1, 10)
        (seqs[i],) = sched.add_request(request(f"r{i}", prompt, max_tokens=max_tokens))
        expected[i] = reference_output(prompt, max_tokens)
    run(sched, runner)  # `step` asserts the token and sequence budgets every step
    assert {i: s.output_token_ids for i, s in seqs.items()} == expected


def test_max_num_seqs_limits_admission() -> None:
    sched = Scheduler(config(max_num_seqs=2), num_blocks=64, eos_token_ids={EOS})
    runner = FakeRunner(sched)
    for i in range(3):
        sched.add_request(request(f"r{i}", [5, 6, 7], max_tokens=2))
    out = step(sched, runner)
    assert [runner.names[c.seq_id] for c in out.chunks] == ["r0", "r1"]
    assert (sched.num_running, sched.num_waiting) == (2, 1)
    run(sched, runner)


def test_pending_decodes_keep_a_token_while_an_older_sequence_prefills() -> None:
    # a's first chunk is cut before its second image (encoder budget), so b is admitted and decodes;
    # next step a's long remaining prefill must leave b its decode token.
    cfg = config(max_num_batched_tokens=20, max_encoder_tiles_per_step=2)
    sched = Scheduler(cfg, num_blocks=64, eos_token_ids={EOS})
    runner = FakeRunner(sched)
    prompt_a = [1] * 4 + [IMG] * 16 + [3] * 30
    mm = [image("x", 4, 8, tiles=2), image("y", 12, 8, tiles=2)]
    sched.add_request(request("a", prompt_a, mm))
    sched.add_request(request("b", [7, 8, 9, 10]))
    assert runner.shape(step(sched, runner)) == [("a", 0, 12, False), ("b", 0, 4, True)]
    assert runner.shape(step(sched, runner)) == [("a", 12, 19, False), ("b", 4, 1, True)]
    run(sched, runner)


def test_stats_snapshot() -> None:
    sched = Scheduler(config(), num_blocks=32, eos_token_ids={EOS})
    sched.add_request(request("a", list(range(20))))
    stats = sched.stats()
    assert (stats.num_running, stats.num_waiting, stats.num_total_blocks) == (0, 1, 32)
    runner = FakeRunner(sched)
    run(sched, runner)
    sched.add_request(request("b", list(range(20))))
    run(sched, runner)
    stats = sched.stats()
    assert (stats.prefix_cache_queries, stats.prefix_cache_hits) == (40, 16)
    assert stats.prefix_cache_hit_rate == pytest.approx(0.4)
    assert stats.kv_usage == 0.0


# --------------------------------------------------------------------------------------- preemption


def test_preemption_recomputes_and_output_is_unchanged() -> None:
    prompts = [[i * 10 + j for j in range(10)] for i in range(4)]
    sched = Scheduler(config(), num_blocks=12, eos_token_ids={EOS})  # 48 slots for 4 x 22 tokens
    runner = FakeRunner(sched)
    seqs = [sched.add_request(request(f"r{i}", p, max_tokens=12))[0] for i, p in enumerate(prompts)]
    outs = run(sched, runner)
    assert any(o.preempted for o in outs)
    assert sum(s.num_preemptions for s in seqs) == sched.num_preemptions > 0
    assert [s.output_token_ids for s in seqs] == [reference_output(p, 12) for p in prompts]


def test_preemption_takes_the_newest_and_requeues_it_first() -> None:
    sched = Scheduler(config(), num_blocks=5, eos_token_ids={EOS})
    runner = FakeRunner(sched)
    a = sched.add_request(request("a", list(range(8)), max_tokens=8))[0]
    b = sched.add_request(request("b", list(range(20, 28)), max_tokens=8))[0]
    c = sched.add_request(request("c", [1, 2, 3, 4, 5], max_tokens=1))[0]
    assert runner.shape(step(sched, runner)) == [("a", 0, 8, True), ("b", 0, 8, True)]  # c: 1 block left
    assert sched.block_manager.num_free_blocks == 1
    out = step(sched, runner)  # a takes the last block; b, the newest, has to preempt itself
    assert out.preempted == [b.seq_id] and list(sched.waiting) == [b, c]
    assert b.num_computed_tokens == 0 and b.block_table == [] and b.status is SequenceStatus.WAITING
    assert runner.shape(out) == [("a", 8, 1, True)]
    run(sched, runner)
    assert b.output_token_ids == reference_output(list(range(20, 28)), 8)
    assert a.finish_reason is b.finish_reason is c.finish_reason is FinishReason.LENGTH


# --------------------------------------------------------------------------------------- abort / stop


def test_abort_mid_prefill_mid_decode_and_waiting() -> None:
    sched = Scheduler(config(max_num_batched_tokens=16), num_blocks=64, eos_token_ids={EOS})
    runner = FakeRunner(sched)
    a = sched.add_request(request("a", list(range(40))))[0]
    step(sched, runner)
    assert a.num_computed_tokens == 16
    assert sched.abort_request("a") == [a] and a.finish_reason is FinishReason.ABORT
    assert sched.abort_request("a") == [] and sched.abort_request("unknown") == []
    sched.check_integrity()
    assert sched.block_manager.num_used_blocks == 0 and not sched.has_unfinished()

    b = sched.add_request(request("b", [5, 6, 7], max_tokens=10))[0]
    c = sched.add_request(request("c", list(range(100, 140))))[0]  # waits: budget used by b + c chunk
    step(sched, runner)
    step(sched, runner)
    assert b.num_output_tokens == 2
    assert sched.abort_request("b") == [b]
    d = sched.add_request(request("d", [1, 2, 3]))[0]
    assert sched.abort_request("d") == [d]  # never scheduled
    sched.check_integrity()
    run(sched, runner)
    assert c.finish_reason is FinishReason.LENGTH


def test_abort_between_schedule_and_update() -> None:
    sched = Scheduler(config(), num_blocks=64, eos_token_ids={EOS})
    runner = FakeRunner(sched)
    sched.add_request(request("a", list(range(9))))
    out = sched.schedule()
    sampled = runner.execute(out)
    sched.abort_request("a")
    assert sched.update(out, sampled) == []
    sched.check_integrity()
    assert sched.block_manager.num_used_blocks == 0


def test_finish_by_the_core_frees_at_once() -> None:
    sched = Scheduler(config(), num_blocks=64, eos_token_ids={EOS})
    runner = FakeRunner(sched)
    (a,) = sched.add_request(request("a", list(range(9)), max_tokens=10))
    step(sched, runner)
    sched.finish(a, FinishReason.STOP)
    sched.finish(a, FinishReason.ABORT)  # idempotent: the first reason stays
    assert a.finish_reason is FinishReason.STOP and not sched.has_unfinished()
    sched.check_integrity()


@pytest.mark.parametrize(
    ("sampling", "script", "outputs", "reason"),
    [
        ({}, [7, EOS, 8], [7, EOS], FinishReason.STOP),
        ({"min_tokens": 2}, [EOS, EOS, EOS, 9], [EOS, EOS, EOS], FinishReason.STOP),
        ({"ignore_eos": True, "max_tokens": 3}, [EOS, EOS, EOS], [EOS, EOS, EOS], FinishReason.LENGTH),
        ({"stop_token_ids": [42]}, [7, 42, 8], [7, 42], FinishReason.STOP),
        ({"max_tokens": 2}, [7, 8, 9], [7, 8], FinishReason.LENGTH),
        ({"max_tokens": None}, [7, 8, 9, 10, 11], [7, 8, 9], FinishReason.LENGTH),  # context length
    ],
)
def test_stop_conditions(sampling, script, outputs, reason) -> None:
    sampling.setdefault("max_tokens", 3)
    sched = Scheduler(config(max_model_len=12), num_blocks=64, eos_token_ids={EOS, 3})
    (seq,) = sched.add_request(request("a", list(range(10, 19)), **sampling))
    run(sched, FakeRunner(sched, script=list(script)))
    assert seq.output_token_ids == outputs and seq.finish_reason is reason
    assert seq.stop_token_id == (outputs[-1] if reason is FinishReason.STOP else None)


# -------------------------------------------------------------------------------------------- n > 1


def test_n_choices_wait_for_the_prompt_then_hit_the_prefix_cache() -> None:
    sched = Scheduler(config(), num_blocks=64, eos_token_ids={EOS})
    runner = FakeRunner(sched)
    prompt = list(range(30, 48))  # 18 tokens: 4 full blocks
    seqs = sched.add_request(request("a", prompt, n=3, max_tokens=3))
    assert [s.index for s in seqs] == [0, 1, 2] and sched.num_waiting == 3
    assert runner.shape(step(sched, runner)) == [("a", 0, 18, True)]
    assert sched.num_waiting == 2 and sched.num_running == 1
    out = step(sched, runner)
    assert [(sched.sequence(c.seq_id).index, c.start, c.num_tokens) for c in out.chunks] == [
        (0, 18, 1),
        (1, 16, 2),
        (2, 16, 2),
    ]
    assert [s.num_cached_tokens for s in seqs] == [0, 16, 16]
    assert [sched.block_manager.ref_count(b) for b in seqs[0].block_table[:4]] == [3, 3, 3, 3]
    run(sched, runner)
    assert all(s.output_token_ids == reference_output(prompt, 3) for s in seqs)


def test_abort_drops_held_back_choices() -> None:
    sched = Scheduler(config(), num_blocks=64, eos_token_ids={EOS})
    seqs = sched.add_request(request("a", list(range(18)), n=3))
    assert sched.abort_request("a") == seqs
    assert sched.num_waiting == 0 and not sched.has_unfinished()
    sched.check_integrity()


# -------------------------------------------------------------------------------------------- media


def mm_prompt(text_before: list[int], num_placeholders: int, text_after: list[int]) -> list[int]:
    return [*text_before, *([IMG] * num_placeholders), *text_after]


def test_encoder_budget_and_each_image_encoded_once() -> None:
    sched = Scheduler(config(max_encoder_tiles_per_step=4), num_blocks=64, eos_token_ids={EOS})
    runner = FakeRunner(sched)
    sched.add_request(request("a", mm_prompt([1, 2, 3, 4], 8, [5] * 4), [image("X", 4, 8, 3)]))
    sched.add_request(request("b", mm_prompt([6, 7, 8, 9], 8, [5] * 4), [image("Y", 4, 8, 3)]))
    sched.add_request(request("c", mm_prompt([9, 9, 9, 9], 8, [5] * 4), [image("X", 4, 8, 3)]))
    out = step(sched, runner)
    assert [m.content_hash for m in out.encoder_inputs] == ["X"]  # Y would exceed 4 tiles
    assert runner.shape(out) == [("a", 0, 16, True), ("b", 0, 4, False), ("c", 0, 16, True)]
    out = step(sched, runner)
    assert [m.content_hash for m in out.encoder_inputs] == ["Y"]
    assert ("b", 4, 12, True) in runner.shape(out)
    run(sched, runner)
    sched.add_request(request("d", mm_prompt([4, 4, 4, 4], 8, [1]), [image("Y", 4, 8, 3)]))
    run(sched, runner)
    assert runner.encoded == ["X", "Y"]  # c and d reused the cached encodings
    assert (sched.encoder_cache.misses, sched.encoder_cache.hits) == (2, 2)


def test_an_image_split_across_chunks_is_encoded_once_and_released_after() -> None:
    sched = Scheduler(config(max_num_batched_tokens=8), num_blocks=64, eos_token_ids={EOS})
    runner = FakeRunner(sched)
    (seq,) = sched.add_request(request("a", mm_prompt([1, 2], 12, [3, 4]), [image("X", 2, 12, 2)]))
    out = step(sched, runner)
    assert runner.shape(out) == [("a", 0, 8, False)] and len(out.encoder_inputs) == 1
    assert out.chunks[0].media == [MediaSlice("X", 2, 0, 6)]
    out = step(sched, runner)
    assert runner.shape(out) == [("a", 8, 8, True)] and out.encoder_inputs == []
    assert out.chunks[0].media == [MediaSlice("X", 0, 6, 6)]
    assert sched.encoder_cache.num_owners("X") == 0 and seq.encoder_refs == set()
    run(sched, runner)


def test_same_placeholders_different_image_never_share_kv() -> None:
    sched = Scheduler(config(), num_blocks=64, eos_token_ids={EOS})
    runner = FakeRunner(sched)
    prompt = mm_prompt([1, 2, 3, 4], 8, [5, 6, 7])
    a = sched.add_request(request("a", prompt, [image("A", 4, 8)]))[0]
    run(sched, runner)
    b = sched.add_request(request("b", prompt, [image("B", 4, 8)]))[0]
    c = sched.add_request(request("c", prompt, [image("A", 4, 8)]))[0]
    run(sched, runner)  # the fake runner checks every KV row against (token, image, row)
    assert (a.num_cached_tokens, b.num_cached_tokens, c.num_cached_tokens) == (0, 4, 12)


def test_evicted_encoding_is_reported_and_recomputed() -> None:
    sched = Scheduler(config(), num_blocks=64, eos_token_ids={EOS})
    sched.encoder_cache = EncoderCache(capacity_rows=16)  # tiny cache (config insists on >= 9472)
    runner = FakeRunner(sched)
    sched.add_request(request("a", mm_prompt([1], 8, [2]), [image("X", 1, 8)]))
    run(sched, runner)
    sched.add_request(request("b", mm_prompt([1], 12, [2]), [image("Y", 1, 12)]))
    out = step(sched, runner)
    assert out.freed_encoder_hashes == ["X"] and [m.content_hash for m in out.encoder_inputs] == ["Y"]
    run(sched, runner)
    sched.add_request(request("c", mm_prompt([3], 8, [2]), [image("X", 1, 8)]))
    run(sched, runner)
    assert runner.encoded == ["X", "Y", "X"]


def test_a_full_encoder_cache_delays_the_chunk_without_deadlock() -> None:
    sched = Scheduler(config(max_num_batched_tokens=8), num_blocks=64, eos_token_ids={EOS})
    sched.encoder_cache = EncoderCache(capacity_rows=12)
    runner = FakeRunner(sched)
    a = sched.add_request(request("a", mm_prompt([1], 12, [2]), [image("X", 1, 12)]))[0]
    b = sched.add_request(request("b", mm_prompt([3], 12, [4]), [image("Y", 1, 12)]))[0]
    assert runner.shape(step(sched, runner)) == [("a", 0, 8, False)]
    # a still holds X: no room for Y, so b's chunk stops before its image; next step X is freeable.
    assert runner.shape(step(sched, runner)) == [("a", 8, 6, True), ("b", 0, 1, False)]
    out = step(sched, runner)
    assert out.freed_encoder_hashes == ["X"] and ("b", 1, 7, False) in runner.shape(out)
    run(sched, runner)
    assert a.output_token_ids == reference_output(a.prompt_token_ids, 4)
    assert b.output_token_ids == reference_output(b.prompt_token_ids, 4)


def test_preempted_sequence_with_media_recomputes_correctly() -> None:
    sched = Scheduler(config(), num_blocks=10, eos_token_ids={EOS})
    runner = FakeRunner(sched)
    prompts, seqs = [], []
    for i in range(3):
        prompt = mm_prompt([i + 1] * 3, 8, [i + 5])
        prompts.append(prompt)
        seqs.append(sched.add_request(request(f"r{i}", prompt, [image(f"h{i}", 3, 8)], max_tokens=8))[0])
    outs = run(sched, runner)
    assert any(o.preempted for o in outs)
    assert [s.output_token_ids for s in seqs] == [reference_output(p, 8) for p in prompts]


# --------------------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("req", "match"),
    [
        (request("a", []), "empty"),
        (request("a", list(range(30)), max_tokens=3), "exceeds the context length 32"),
        (request("a", list(range(31)), max_tokens=None), None),  # fits: prompt + 1 token
        (request("a", [IMG] * 10, [image("x", 0, 6), image("y", 4, 6)]), "overlaps"),
        (request("a", [IMG] * 10, [image("x", 6, 6)]), "out of the prompt"),
        (request("a", [IMG] * 10, [image("x", 0, 0)]), "empty"),
    ],
)
def test_request_validation(req: EngineRequest, match: str | None) -> None:
    sched = Scheduler(config(max_model_len=32), num_blocks=64, eos_token_ids={EOS})
    if match is None:
        sched.add_request(req)
        return
    with pytest.raises(RequestRejectedError, match=match):
        sched.add_request(req)
    assert not sched.has_unfinished()


def test_rejects_what_can_never_fit() -> None:
    sched = Scheduler(config(), num_blocks=4, eos_token_ids={EOS})
    with pytest.raises(RequestRejectedError, match="KV blocks"):
        sched.add_request(request("a", list(range(10)), max_tokens=10))  # 20 tokens > 16 slots
    sched.add_request(request("a", list(range(10)), max_tokens=6))
    with pytest.raises(RequestRejectedError, match="already in use"):
        sched.add_request(request("a", [1, 2]))
    small = Scheduler(
        config(encoder_cache_tokens=9472, max_model_len=11520), num_blocks=4096, eos_token_ids={EOS}
    )
    with pytest.raises(RequestRejectedError, match="encoder cache"):
        small.add_request(request("b", [IMG] * 9473, [image("x", 0, 9473)], max_tokens=1))


def test_queue_bound() -> None:
    sched = Scheduler(config(max_waiting_requests=2), num_blocks=64, eos_token_ids={EOS})
    sched.add_request(request("a", [1, 2]))
    sched.add_request(request("b", [1, 2]))
    with pytest.raises(EngineOverloadedError):
        sched.add_request(request("c", [1, 2]))
    assert sched.num_waiting == 2


def test_n_choices_without_prefix_caching_start_together() -> None:
    sched = Scheduler(config(enable_prefix_caching=False), num_blocks=64, eos_token_ids={EOS})
    runner = FakeRunner(sched)
    seqs = sched.add_request(request("a", list(range(18)), n=2, max_tokens=2))
    assert [sched.sequence(c.seq_id).index for c in step(sched, runner).chunks] == [0, 1]
    run(sched, runner)
    assert seqs[0].output_token_ids == seqs[1].output_token_ids


# ------------------------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"dtype": "fp8"}, "dtype='fp8'"),
        ({"device": "tpu"}, "device='tpu'"),
        ({"max_model_len": 0}, "max_model_len=0"),
        ({"max_num_batched_tokens": 100, "max_num_seqs": 256}, "below max_num_seqs"),
        ({"encoder_cache_tokens": 0}, "encoder_cache_tokens=0"),
        ({"gpu_memory_utilization": 1.5}, r"\(0, 1\]"),
        ({"num_kv_blocks": 0}, "num_kv_blocks=0"),
        ({"model": ""}, "model"),
    ],
)
def test_config_validation(overrides: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        config(**overrides)


def test_config_replace_validates_and_refuses_unknown_names() -> None:
    cfg = config(max_num_seqs=32)
    assert cfg.replace(max_model_len=1024).max_model_len == 1024 and cfg.max_model_len == 4096
    with pytest.raises(ValueError, match="below max_num_seqs"):
        cfg.replace(max_num_batched_tokens=16)
    with pytest.raises(ValueError, match="unknown engine setting"):
        cfg.replace(max_batch=3)


# ------------------------------------------------------------------------------- overlapped scheduling


def mixed_workload() -> list[tuple[EngineRequest, int | None]]:
    """(request, abort after this many outputs or None): text, chunked prompts, images, n > 1, stops."""
    rng = random.Random(1)
    reqs: list[tuple[EngineRequest, int | None]] = []
    for i in range(12):
        prompt = [rng.randrange(3, 500) for _ in range(rng.randrange(5, 90))]
        reqs.append((request(f"t{i}", prompt, max_tokens=rng.randrange(1, 12)), 3 if i == 4 else None))
    for i in range(4):
        n_img = 8 + 4 * i
        prompt = mm_prompt([1, 2, 3], n_img, [7] * (5 + i))
        reqs.append((request(f"m{i}", prompt, [image(f"img{i % 3}", 3, n_img, tiles=2)], max_tokens=6), None))
    reqs.append((request("n3", list(range(40, 62)), n=3, max_tokens=5), None))
    stop = reference_output(list(range(70, 80)), 9)[3]  # the 4th output ends it
    reqs.append((request("eos", list(range(70, 80)), max_tokens=9, stop_token_ids=[stop]), None))
    return reqs


def drive(overlapped: bool, num_blocks: int, **cfg) -> dict[tuple[str, int], tuple[list[int], FinishReason]]:
    """Run `mixed_workload` (arrivals spread over the first steps); returns (request, choice) -> outputs."""
    sched = Scheduler(config(**cfg), num_blocks=num_blocks, eos_token_ids={EOS})
    runner = FakeRunner(sched)
    work = mixed_workload()
    seqs, aborts = {}, {}
    in_flight: list = []
    steps = 0
    while work or sched.has_unfinished() or in_flight:
        if work and steps % 2 == 0:  # two arrivals every other step
            for req, abort_after in work[:2]:
                for s in sched.add_request(req):
                    seqs[(req.request_id, s.index)] = s
                if abort_after is not None:
                    aborts[req.request_id] = abort_after
            work = work[2:]
        out = sched.schedule()
        check_step(sched, out)
        if out.has_work:
            in_flight.append((out, runner.launch(out)))
        if in_flight and (not overlapped or len(in_flight) > 1 or not out.has_work):
            done, sampled = in_flight.pop(0)
            for seq in sched.update(done, sampled):
                if aborts.get(seq.request_id) == seq.num_output_tokens:
                    sched.abort_request(seq.request_id)
        sched.check_integrity()
        steps += 1
        assert steps < 3000, "no progress"
    return {k: (s.output_token_ids, s.finish_reason) for k, s in seqs.items()}


@pytest.mark.parametrize(
    ("num_blocks", "cfg"),
    [
        (400, {}),  # plenty of room
        (24, {}),  # preemptions
        (400, {"max_num_batched_tokens": 16, "max_encoder_tiles_per_step": 2}),  # chunked, images wait
        (400, {"max_prefill_tokens_per_decode_step": 5}),
    ],
)
def test_overlapped_loop_gives_the_synchronous_outputs(num_blocks, cfg) -> None:
    sync = drive(False, num_blocks, **cfg)
    overlapped = drive(True, num_blocks, **cfg)
    assert overlapped == sync
    reasons = {r for _, r in sync.values()}
    assert FinishReason.ABORT in reasons and FinishReason.STOP in reasons and FinishReason.LENGTH in reasons
    assert sync[("n3", 2)][0] == sync[("n3", 0)][0] == reference_output(list(range(40, 62)), 5)


def test_overlapped_loop_never_schedules_past_max_tokens() -> None:
    sched = Scheduler(config(), num_blocks=64, eos_token_ids={EOS})
    runner = FakeRunner(sched)
    (seq,) = sched.add_request(request("a", list(range(10)), max_tokens=3))
    outs = run_overlapped(sched, runner)
    assert [runner.shape(o) for o in outs] == [
        [("a", 0, 10, True)],
        [("a", 10, 1, True)],
        [("a", 11, 1, True)],
    ]
    assert seq.output_token_ids == reference_output(list(range(10)), 3)


def test_a_preempted_sequence_keeps_its_token_in_flight() -> None:
    # b is preempted while its first decode is in flight: the token still lands, and recompute continues from it.
    sched = Scheduler(config(), num_blocks=5, eos_token_ids={EOS})
    runner = FakeRunner(sched)
    a = sched.add_request(request("a", list(range(8)), max_tokens=8))[0]
    b = sched.add_request(request("b", list(range(20, 28)), max_tokens=8))[0]
    run_overlapped(sched, runner)
    assert b.num_preemptions > 0
    assert a.output_token_ids == reference_output(list(range(8)), 8)
    assert b.output_token_ids == reference_output(list(range(20, 28)), 8)


# ----------------------------------------------------------------------------- media and mixed traffic


def test_an_asynchronous_encoder_never_stalls_the_decodes() -> None:
    # The image is encoded on its own stream and takes 3 steps: its prompt prefills the text before it, waits,
    # then continues; the running decode gets its token every step meanwhile.
    sched = Scheduler(config(), num_blocks=64, eos_token_ids={EOS})
    runner = FakeRunner(sched, ready_after=3)
    sched.encode_ahead, sched.media_ready = True, runner.media_ready
    (d,) = sched.add_request(request("d", [5, 6, 7], max_tokens=12))
    step(sched, runner)
    prompt = mm_prompt([1, 2, 3, 4], 8, [5] * 4)
    (m,) = sched.add_request(request("m", prompt, [image("X", 4, 8, 3)], max_tokens=2))
    shapes = [runner.shape(step(sched, runner)) for _ in range(6)]
    assert shapes[0] == [("d", 3, 1, True), ("m", 0, 4, False)]  # text before the image; X starts encoding
    assert shapes[1:4] == [[("d", 4, 1, True)], [("d", 5, 1, True)], [("d", 6, 1, True)]]  # m waits
    assert shapes[4] == [("d", 7, 1, True), ("m", 4, 12, True)]  # ready: the image and the rest in one chunk
    assert [s[0][0] for s in shapes] == ["d"] * 6  # d decodes in every step
    run(sched, runner)
    assert d.output_token_ids == reference_output([5, 6, 7], 12)
    assert m.output_token_ids == reference_output(prompt, 2)


def test_consecutive_images_wait_without_blocking_their_sequence_forever() -> None:
    sched = Scheduler(config(max_encoder_tiles_per_step=2), num_blocks=64, eos_token_ids={EOS})
    runner = FakeRunner(sched, ready_after=2)
    sched.encode_ahead, sched.media_ready = True, runner.media_ready
    prompt = [1, 2] + [IMG] * 16 + [3]
    mm = [image("X", 2, 8, tiles=2), image("Y", 10, 8, tiles=2)]  # Y starts where X ends
    (seq,) = sched.add_request(request("a", prompt, mm, max_tokens=3))
    run(sched, runner)
    assert runner.encoded == ["X", "Y"]
    assert seq.output_token_ids == reference_output(prompt, 3)


def test_prefill_is_capped_only_while_sequences_decode() -> None:
    sched = Scheduler(config(max_num_batched_tokens=64, max_prefill_tokens_per_decode_step=8), 64, {EOS})
    runner = FakeRunner(sched)
    sched.add_request(request("a", list(range(10, 50)), max_tokens=20))
    assert runner.shape(step(sched, runner)) == [("a", 0, 40, True)]  # nothing decodes: the whole budget
    sched.add_request(request("b", list(range(100, 130)), max_tokens=2))
    shapes = [runner.shape(step(sched, runner)) for _ in range(4)]
    assert shapes == [
        [("a", 40, 1, True), ("b", 0, 8, False)],
        [("a", 41, 1, True), ("b", 8, 8, False)],
        [("a", 42, 1, True), ("b", 16, 8, False)],
        [("a", 43, 1, True), ("b", 24, 6, True)],
    ]
    run(sched, runner)


def h200_step_ms(num_decodes: int, prefill_tokens: int, prefix: int) -> float:
    """Estimated PLM-1B step time on one H200 (docs/engine-gpu.md): every row shares one read of the 2.47 GB
    of weights, linear layers cost 1.95 GFLOP per row, a prefill row attends over its prefix (131 kFLOP per
    key), all at 70% of 4.3 TB/s and 790 TFLOP/s, plus 0.1 ms of fixed cost (decode attention over short
    contexts is negligible here)."""
    rows = num_decodes + prefill_tokens
    linear = max(2.47e9 / 4.3e12, rows * 1.95e9 / 790e12) / 0.7
    attention = prefill_tokens * 131072 * prefix / 790e12 / 0.7
    return 1e3 * (linear + attention) + 0.1


def test_running_streams_keep_their_pace_while_a_large_image_prompt_arrives() -> None:
    """Scheduler-level simulation of mixed traffic at PLM-1B shapes (block size 16, a 36-tile image).

    32 streams decode; a 9.3k-token image prompt arrives. Every stream must get a token in every step, and under
    the step-time estimate above, with the default `max_prefill_tokens_per_decode_step`, no inter-token gap
    while the prompt is prefilled may exceed 2x the steady gap (so neither may the p99), and the prompt's
    first token must still come in well under 100 ms of estimated time.
    """
    # The defaults (16k budget, capped prefill while decoding) and PLM's context length.
    cfg = EngineConfig(model="sim", max_num_seqs=64, max_model_len=11520)
    sched = Scheduler(cfg, num_blocks=4096, eos_token_ids={EOS})
    runner = FakeRunner(sched, ready_after=20)  # the encoder takes ~20 steps, on its own stream
    sched.encode_ahead, sched.media_ready = True, runner.media_ready
    streams = [sched.add_request(request(f"s{i}", [9, i + 10, 11], max_tokens=400))[0] for i in range(32)]
    step(sched, runner)  # their prefills
    steady = h200_step_ms(32, 0, 0)
    prompt = mm_prompt(list(range(20, 40)), 36 * 256, list(range(50, 100)))
    (img,) = sched.add_request(request("img", prompt, [image("big", 20, 36 * 256, tiles=36)], max_tokens=4))
    gaps, steps = [], 0
    while img.num_output_tokens == 0:
        out = step(sched, runner)
        steps += 1
        decodes = [c for c in out.chunks if c.is_decode and runner.names[c.seq_id].startswith("s")]
        assert len(decodes) == 32, "a running stream missed a step"
        prefill = [c for c in out.chunks if not c.is_decode]
        tokens = sum(c.num_tokens for c in prefill)
        assert tokens <= cfg.max_prefill_tokens_per_decode_step
        gaps.append(h200_step_ms(32, tokens, max((c.start for c in prefill), default=0)))
        assert steps < 200
    assert max(gaps) <= 2 * steady, (max(gaps), steady)
    assert sum(gaps) < 100, sum(gaps)  # the image's time to first token in the estimate (ms)
    assert all(s.num_output_tokens >= steps for s in streams)


# ------------------------------------------------------------------------------------------ fault isolation


@pytest.mark.parametrize("encoder_delay", [0, 2], ids=["synchronous-encoder", "asynchronous-encoder"])
def test_rolled_back_steps_recompute_the_same_tokens_with_each_suspect_alone(encoder_delay: int) -> None:
    """Two steps in flight are lost (their tokens never arrive, their blocks and encodings are void): every
    sequence recomputes to the reference tokens, each request first runs alone until it gets a token, and
    nothing leaks. The lost encoding is dropped and encoded again, never served from the voided entry."""
    sched = Scheduler(config(), num_blocks=128, eos_token_ids={EOS})
    runner = FakeRunner(sched, ready_after=encoder_delay)
    if encoder_delay:  # chunks wait outside an image until its encoding (on its own stream) is done
        sched.encode_ahead, sched.media_ready = True, runner.media_ready
    prompts = {"a": list(range(10, 40)), "m": mm_prompt([1, 2, 3], 12, [7] * 6), "b": list(range(50, 61))}
    reqs = [
        request("a", prompts["a"], max_tokens=6),
        request("m", prompts["m"], [image("img", 3, 12, tiles=2)], max_tokens=6),
        request("b", prompts["b"], max_tokens=6),
    ]
    seqs = {r.request_id: sched.add_request(r)[0] for r in reqs}
    lost = [sched.schedule(), sched.schedule()]  # the prefills (and the image), then the first decodes
    for out in lost:  # they run (KV written, the image encoded), but their tokens never arrive
        runner.launch(out)
    assert "img" in [m.content_hash for out in lost for m in out.encoder_inputs]
    seq_ids = [c.seq_id for out in lost for c in out.chunks]
    encoded = [m.content_hash for out in lost for m in out.encoder_inputs]
    assert sorted(sched.roll_back(seq_ids, encoded)) == ["a", "b", "m"]
    sched.check_integrity()
    alone: list[str] = []
    while sched.has_suspects:
        suspects = set(sched._suspects)
        out = step(sched, runner)
        names = {runner.names[c.seq_id] for c in out.chunks}
        if out.isolated is not None:
            assert names <= {out.isolated}, "a suspect ran with others"
            alone.append(out.isolated)
        else:  # the oldest suspect waits (for its encoding): everyone else runs, no suspect among them
            assert not names & suspects
        assert len(alone) < 100, "no progress"
    assert set(alone) == {"a", "b", "m"}
    run(sched, runner)
    for rid, seq in seqs.items():
        assert seq.token_ids[seq.num_prompt_tokens :] == reference_output(prompts[rid], 6), rid
    assert sched.block_manager.num_used_blocks == 0
