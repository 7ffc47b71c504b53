"""The overlapped engine loop (schedule and launch step N+1 before applying step N) against the synchronous one,
on the tiny checkpoint with the torch reference backend: the same tokens, texts and finish reasons for text,
images, chunked prefill, preemption, aborts, stop strings and n > 1 with seeded sampling; and with the features that
make it run a stretch synchronously (a grammar-constrained request, a request suspected of a fault) or read back
at once (prompt scoring)."""

from __future__ import annotations

import itertools

import pytest
from tokenizers import Tokenizer

from plm_serve.engine import EngineConfig, EngineCore, FinishReason, StructuredOutputParams
from tests import reference
from tests.engine import engine_fixtures as fx

Outputs = dict[tuple[str, int], tuple[list[int], str, FinishReason | None]]
Scores = dict[str, list]  # request id -> its prompt logprobs (those that asked)


@pytest.fixture(scope="module")
def prompts(ckpt_l):
    return fx.standard_prompts(reference.load_hf_processor(ckpt_l))


def drive(
    ckpt, overlap: bool, reqs, abort_after: dict[str, int], scores: Scores | None = None, **overrides
) -> tuple[Outputs, EngineCore]:
    args = dict(model=str(ckpt), device="cpu", dtype="float32", num_kv_blocks=512, max_num_batched_tokens=256)
    core = EngineCore.load(EngineConfig(**{**args, **overrides, "overlap_scheduling": overlap}))
    outputs: Outputs = {}
    for r in reqs:
        core.add_request(r)
        for i in range(r.sampling.n):
            outputs[(r.request_id, i)] = ([], "", None)
    steps = 0
    while core.has_unfinished():
        emitted = core.step()
        while emitted:
            out = emitted.pop(0)
            assert out.error is None, out.error
            if out.prompt_logprobs is not None and scores is not None:
                scores[out.request_id] = out.prompt_logprobs
            tokens, text, _ = outputs[(out.request_id, out.index)]
            tokens, text = tokens + out.token_ids, text + out.text
            outputs[(out.request_id, out.index)] = (tokens, text, out.finish_reason)
            if len(tokens) == abort_after.get(out.request_id) and not out.finished:
                emitted += core.abort_request(out.request_id)  # the consumer went away after k tokens
        steps += 1
        assert steps < 2000
    core.scheduler.check_integrity()
    assert core.scheduler.block_manager.num_used_blocks == 0
    return outputs, core


def test_overlapped_equals_synchronous_on_a_mixed_workload(ckpt_l, prompts):
    text, image, _, _, system = prompts
    full = Tokenizer.from_file(str(ckpt_l / "tokenizer.json")).decode(
        fx.hf_greedy(reference.load_hf_model(ckpt_l), text, 10)
    )
    middle = len(full) // 2
    stop = next(full[i : i + 3] for i in range(middle, len(full) - 2) if full[i : i + 3].strip())
    reqs = [
        fx.request(image, "image", max_tokens=6, min_tokens=6),  # a 1.3k-token prompt: chunked
        fx.request(text, "stop", max_tokens=10, min_tokens=10, stop=[stop]),
        fx.request(text, "abort", max_tokens=10, min_tokens=10),
        fx.request(system, "n2", max_tokens=6, min_tokens=6, temperature=1.0, seed=7, n=2),
    ]
    sync, _ = drive(ckpt_l, False, reqs, {"abort": 3})
    overlapped, core = drive(ckpt_l, True, reqs, {"abort": 3})
    assert core.overlap
    assert overlapped == sync
    assert sync[("image", 0)][0] == fx.hf_greedy(reference.load_hf_model(ckpt_l), image, 6)
    assert sync[("stop", 0)][2] is FinishReason.STOP and stop not in sync[("stop", 0)][1]
    assert sync[("abort", 0)][2] is FinishReason.ABORT and len(sync[("abort", 0)][0]) == 3
    assert sync[("n2", 0)][0] != sync[("n2", 1)][0]  # two seeded choices, each reproduced


def test_overlapped_equals_synchronous_under_preemption(ckpt_l, prompts):
    chosen = [prompts[0], prompts[4]] * 3
    blocks = lambda n: -(-n // 16)
    pool = sum(blocks(len(p.input_ids)) for p in chosen) + 2  # prompts fit, their 12 outputs do not
    reqs = [fx.request(p, f"p{i}", max_tokens=12, min_tokens=12) for i, p in enumerate(chosen)]
    sync, sync_core = drive(ckpt_l, False, reqs, {}, num_kv_blocks=pool, enable_prefix_caching=False)
    overlapped, core = drive(ckpt_l, True, reqs, {}, num_kv_blocks=pool, enable_prefix_caching=False)
    assert sync_core.stats.num_preemptions > 0 and core.stats.num_preemptions > 0
    assert overlapped == sync


def test_overlapped_equals_synchronous_with_grammars_and_prompt_scores(ckpt_l, prompts):
    """A constrained request sits out the step after each of its tokens (its mask needs that token) while the
    loop keeps overlapping; prompt scores are read back in the launching step. Neither changes a token."""
    text, image, _, _, system = prompts
    digits = StructuredOutputParams("regex", "[0-9]{3,6}")
    reqs = [
        fx.request(text, "free", max_tokens=12, min_tokens=12),
        fx.request(system, "grammar", max_tokens=12, temperature=1.0, seed=3, structured_output=digits),
        fx.request(image, "scored", max_tokens=4, min_tokens=4, prompt_logprobs=2),
        fx.request(text, "late", max_tokens=8, min_tokens=8),
    ]
    sync_scores: Scores = {}
    overlapped_scores: Scores = {}
    sync, _ = drive(ckpt_l, False, reqs, {}, sync_scores)
    overlapped, _ = drive(ckpt_l, True, reqs, {}, overlapped_scores)
    assert overlapped == sync
    # The same scores; the prompt's chunks may meet other batch shapes in the two loops (fp32 sums differ in
    # the last bits), so logprobs are compared within rounding.
    assert overlapped_scores.keys() == sync_scores.keys()
    for got, want in zip(overlapped_scores["scored"], sync_scores["scored"], strict=True):
        if want is None:
            assert got is None
            continue
        assert got.token_id == want.token_id and abs(got.logprob - want.logprob) < 1e-4
        assert [t for t, _, _ in got.top] == [t for t, _, _ in want.top]
    _, out_text, reason = sync[("grammar", 0)]
    assert reason is FinishReason.STOP and out_text.isdigit() and 3 <= len(out_text) <= 6
    assert len(sync_scores["scored"]) == len(image.input_ids) and sync_scores["scored"][0] is None


def test_a_fault_in_an_overlapped_step_fails_only_its_culprit(ckpt_l, prompts):
    text, _, _, _, system = prompts
    reqs = lambda: [
        fx.request(text, "greedy", max_tokens=8, min_tokens=8),
        fx.request(system, "seeded", max_tokens=8, min_tokens=8, temperature=1.0, seed=11),
    ]
    clean, _ = drive(ckpt_l, True, reqs(), {})
    args = dict(
        model=str(ckpt_l), device="cpu", dtype="float32", num_kv_blocks=512, max_num_batched_tokens=256
    )
    core = EngineCore.load(EngineConfig(**args, overlap_scheduling=True))
    launch, live = core.runner.launch, core.scheduler.sequence

    def faulty(sched):  # the culprit's steps raise once its third token is known (steps are in flight)
        for c in sched.chunks:
            seq = live(c.seq_id)
            if seq is not None and seq.request_id == "culprit" and seq.num_output_tokens >= 3:
                raise RuntimeError("simulated fault")
        return launch(sched)

    core.runner.launch = faulty
    culprit = fx.request(text, "culprit", max_tokens=8, min_tokens=8)
    for r in [*reqs(), culprit]:
        core.add_request(r)
    finished: dict[str, FinishReason] = {}
    tokens: dict[str, list[int]] = {"greedy": [], "seeded": [], "culprit": []}
    for _ in range(500):
        if not core.has_unfinished():
            break
        for out in core.step():
            tokens[out.request_id] += out.token_ids
            if out.finished:
                finished[out.request_id] = out.finish_reason
    assert finished == {
        "greedy": FinishReason.LENGTH,
        "seeded": FinishReason.LENGTH,
        "culprit": FinishReason.ERROR,
    }
    assert tokens["greedy"] == clean[("greedy", 0)][0] and tokens["seeded"] == clean[("seeded", 0)][0]
    assert len(tokens["culprit"]) == 3
    core.scheduler.check_integrity()
    assert core.scheduler.block_manager.num_used_blocks == 0 and not core.scheduler.has_suspects


def test_the_loop_keeps_overlapping_while_a_grammar_runs(ckpt_l, prompts):
    text, _, _, _, system = prompts
    args = dict(
        model=str(ckpt_l), device="cpu", dtype="float32", num_kv_blocks=512, max_num_batched_tokens=256
    )
    core = EngineCore.load(EngineConfig(**args, overlap_scheduling=True))
    digits = StructuredOutputParams("regex", "[0-9]{12}")
    core.add_request(fx.request(system, "grammar", max_tokens=12, structured_output=digits))
    core.add_request(fx.request(text, "free", max_tokens=24, min_tokens=24))
    live = lambda rid: any(s.request_id == rid for s in core.scheduler.running)
    overlapped_with_grammar = 0
    launched: list[set[str]] = []
    launch = core.runner.launch

    def recording(sched):
        launched.append({s.request_id for c in sched.chunks if (s := core.scheduler.sequence(c.seq_id))})
        return launch(sched)

    core.runner.launch = recording
    text_out = ""
    while core.has_unfinished():
        for out in core.step():
            if out.request_id == "grammar":
                text_out += out.text
        if live("grammar") and len(core._in_flight) == 1:
            overlapped_with_grammar += 1  # a step still in flight after step() returned: the overlap
    assert overlapped_with_grammar > 5
    assert text_out.isdigit() and len(text_out) == 12
    grammar_steps = [i for i, names in enumerate(launched) if "grammar" in names]
    assert len(grammar_steps) >= 3 and all(b - a >= 2 for a, b in itertools.pairwise(grammar_steps))
