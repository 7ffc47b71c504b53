"""Scheduler, driven by a fake runner that follows the runner contract on a fake KV pool.

The fake runner writes each chunk's (token, media row) into the slots given by the block table and,
when a chunk samples, reads the whole context back from those slots, as attention would: wrong block
sharing or a lost block fails there. Its "model" is a deterministic function of the context, so every
run must produce the same tokens as `reference_output`, however it was scheduled or preempted.
"""

from __future__ import annotations

import random

import pytest
import torch

from plm_serve.engine.config import EngineConfig
from plm_serve.engine.encoder_cache import EncoderCache
from plm_serve.engine.errors import EngineOverloadedError, RequestRejectedError
from plm_serve.engine.request import EngineRequest, FinishReason, MMInput, SamplingParams
from plm_serve.engine.scheduler import Scheduler, SchedulerOutput
from plm_serve.engine.sequence import Sequence, SequenceStatus

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
    def __init__(self, sched: Scheduler, script: list[int] | None = None) -> None:
        self.sched = sched
        self.kv: dict[int, tuple[int, str | None, int]] = {}  # slot -> (token, media hash, media row)
        self.media: set[str] = set()  # encoder outputs held, by hash
        self.encoded: list[str] = []  # every encoding ever run
        self.script = script  # fixed sampled tokens instead of the fake model

    def slot(self, seq: Sequence, pos: int) -> int:
        return seq.block_table[pos // BS] * BS + pos % BS

    @staticmethod
    def content(seq: Sequence, pos: int) -> tuple[int, str | None, int]:
        for m in seq.mm_inputs:
            if m.offset <= pos < m.offset + m.length:
                return (seq.token_ids[pos], m.content_hash, pos - m.offset)
        return (seq.token_ids[pos], None, 0)

    def execute(self, out: SchedulerOutput) -> dict[int, int]:
        for h in out.freed_encoder_hashes:
            self.media.discard(h)
        for m in out.encoder_inputs:
            assert m.content_hash not in self.media, "encoded again while cached"
            self.media.add(m.content_hash)
            self.encoded.append(m.content_hash)
        sampled = {}
        for c in out.chunks:
            for item, _, _, _ in c.media_slices():
                assert item.content_hash in self.media, "chunk needs media that is not encoded"
            for pos in range(c.start, c.end):
                self.kv[self.slot(c.seq, pos)] = self.content(c.seq, pos)
            if c.sample:
                context = [self.kv[self.slot(c.seq, pos)] for pos in range(c.end)]
                assert context == [self.content(c.seq, p) for p in range(c.end)], "KV corrupted"
                tokens = [t for t, _, _ in context]
                sampled[c.seq.seq_id] = self.script.pop(0) if self.script else next_token(tokens)
        return sampled


def step(sched: Scheduler, runner: FakeRunner) -> SchedulerOutput:
    out = sched.schedule()
    cfg = sched.config
    assert out.num_batched_tokens == sum(c.num_tokens for c in out.chunks) <= cfg.max_num_batched_tokens
    assert len({c.seq.seq_id for c in out.chunks}) == len(out.chunks) <= cfg.max_num_seqs
    assert len({m.content_hash for m in out.encoder_inputs}) == len(out.encoder_inputs)
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


def shape(out: SchedulerOutput) -> list[tuple[str, int, int, bool]]:
    return [(c.seq.request_id, c.start, c.num_tokens, c.sample) for c in out.chunks]


# ------------------------------------------------------------------------------------------- basics


def test_chunked_prefill_then_decode() -> None:
    sched = Scheduler(config(max_num_batched_tokens=32), num_blocks=64, eos_token_ids={EOS})
    runner = FakeRunner(sched)
    prompt = list(range(10, 110))
    (seq,) = sched.add_request(request("a", prompt, max_tokens=3))
    outs = run(sched, runner)
    assert [shape(o) for o in outs] == [
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
    assert shape(step(sched, runner)) == [("a", 0, 10, True)]
    sched.add_request(request("b", list(range(50, 70)), max_tokens=2))
    out = step(sched, runner)
    assert shape(out) == [("a", 10, 1, True), ("b", 0, 20, True)]
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
    assert [c.seq.request_id for c in out.chunks] == ["r0", "r1"]
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
    assert shape(step(sched, runner)) == [("a", 0, 12, False), ("b", 0, 4, True)]
    assert shape(step(sched, runner)) == [("a", 12, 19, False), ("b", 4, 1, True)]
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
    assert shape(step(sched, runner)) == [("a", 0, 8, True), ("b", 0, 8, True)]  # c: 1 block left
    assert sched.block_manager.num_free_blocks == 1
    out = step(sched, runner)  # a takes the last block; b, the newest, has to preempt itself
    assert out.preempted == [b] and list(sched.waiting) == [b, c]
    assert b.num_computed_tokens == 0 and b.block_table == [] and b.status is SequenceStatus.WAITING
    assert shape(out) == [("a", 8, 1, True)]
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
    assert shape(step(sched, runner)) == [("a", 0, 18, True)]
    assert sched.num_waiting == 2 and sched.num_running == 1
    out = step(sched, runner)
    assert [(c.seq.index, c.start, c.num_tokens) for c in out.chunks] == [(0, 18, 1), (1, 16, 2), (2, 16, 2)]
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
    assert shape(out) == [("a", 0, 16, True), ("b", 0, 4, False), ("c", 0, 16, True)]
    out = step(sched, runner)
    assert [m.content_hash for m in out.encoder_inputs] == ["Y"]
    assert ("b", 4, 12, True) in shape(out)
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
    assert shape(out) == [("a", 0, 8, False)] and len(out.encoder_inputs) == 1
    assert out.chunks[0].media_slices() == [(seq.mm_inputs[0], 2, 0, 6)]
    out = step(sched, runner)
    assert shape(out) == [("a", 8, 8, True)] and out.encoder_inputs == []
    assert out.chunks[0].media_slices() == [(seq.mm_inputs[0], 0, 6, 6)]
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
    assert shape(step(sched, runner)) == [("a", 0, 8, False)]
    # a still holds X: no room for Y, so b's chunk stops before its image; next step X is freeable.
    assert shape(step(sched, runner)) == [("a", 8, 6, True), ("b", 0, 1, False)]
    out = step(sched, runner)
    assert out.freed_encoder_hashes == ["X"] and ("b", 1, 7, False) in shape(out)
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
    assert [c.seq.index for c in step(sched, runner).chunks] == [0, 1]
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
