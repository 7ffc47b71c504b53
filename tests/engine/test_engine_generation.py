"""The whole engine on tiny checkpoints: continuous batching gives exactly transformers' greedy tokens."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from plm_serve.engine import EngineConfig, EngineCore, FinishReason, RequestRejectedError
from tests import reference
from tests.engine import engine_fixtures as fx


def make_core(ckpt, **overrides) -> EngineCore:
    args = dict(
        model=str(ckpt), device="cpu", dtype="float32", num_kv_blocks=512, max_num_batched_tokens=2048
    )
    args.update(overrides)
    return EngineCore.load(EngineConfig(**args))


def run_all(core: EngineCore, arrivals: dict[int, list] | None = None) -> dict[str, list[int]]:
    """Step until idle; `arrivals[step]` lists requests added before that step. Returns tokens per request id."""
    arrivals = dict(arrivals or {})
    tokens: dict[str, list[int]] = {}
    step = 0
    while arrivals or core.has_unfinished():
        for req in arrivals.pop(step, []):
            core.add_request(req)
            tokens[req.request_id] = []
        for out in core.step():
            assert out.error is None, out.error
            tokens[out.request_id].extend(out.token_ids)
        step += 1
        assert step < 10_000
    core.scheduler.check_integrity()
    return tokens


@pytest.fixture(scope="module")
def processor_l(ckpt_l):
    return reference.load_hf_processor(ckpt_l)


@pytest.fixture(scope="module")
def prompts_l(processor_l):
    return fx.standard_prompts(processor_l)


@pytest.fixture(scope="module")
def hf_tokens_l(ckpt_l, prompts_l):
    model = reference.load_hf_model(ckpt_l)
    return {p.name: fx.hf_greedy(model, p, 16) for p in prompts_l}


def test_sixteen_concurrent_requests_match_transformers_and_solo_runs(ckpt_l, prompts_l, hf_tokens_l):
    lengths = [16, 9, 12, 5]
    reqs = [
        fx.request(
            prompts_l[i % len(prompts_l)], f"r{i}", max_tokens=lengths[i % 4], min_tokens=lengths[i % 4]
        )
        for i in range(16)
    ]
    # Arrive in waves at different steps, so prefills join running decodes; small token budget forces chunking.
    arrivals = {0: reqs[:5], 2: reqs[5:9], 3: reqs[9:12], 7: reqs[12:]}
    batched = run_all(make_core(ckpt_l, max_num_batched_tokens=1024, max_num_seqs=8), arrivals)
    solo_core = make_core(ckpt_l, enable_prefix_caching=False)
    for i, req in enumerate(reqs):
        prompt = prompts_l[i % len(prompts_l)]
        want = hf_tokens_l[prompt.name][: lengths[i % 4]]
        assert batched[req.request_id] == want, (req.request_id, prompt.name)
        if i < len(prompts_l):
            solo = run_all(solo_core, {0: [fx.request(prompt, "solo", max_tokens=16, min_tokens=16)]})
            assert solo["solo"] == hf_tokens_l[prompt.name]


def test_g_family_greedy_matches_transformers(ckpt_g):
    processor = reference.load_hf_processor(ckpt_g)
    prompts = fx.standard_prompts(processor)[:4]
    model = reference.load_hf_model(ckpt_g)
    core = make_core(ckpt_g)
    got = run_all(core, {0: [fx.request(p, p.name, max_tokens=10, min_tokens=10) for p in prompts]})
    for p in prompts:
        assert got[p.name] == fx.hf_greedy(model, p, 10), p.name


def test_prefix_cache_reuses_blocks_and_keeps_output(ckpt_l, prompts_l, hf_tokens_l):
    core = make_core(ckpt_l)
    image = prompts_l[1]
    first = run_all(core, {0: [fx.request(image, "a", max_tokens=8, min_tokens=8)]})
    hits_before = core.stats.prefix_cache_hits
    second = run_all(core, {0: [fx.request(image, "b", max_tokens=8, min_tokens=8)]})
    reused = core.stats.prefix_cache_hits - hits_before
    assert second["b"] == first["a"] == hf_tokens_l["image"][:8]
    assert reused >= (len(image.input_ids) // 16 - 1) * 16  # every full block but possibly the last


def test_same_text_different_image_never_shares_image_blocks(ckpt_l, processor_l):
    core = make_core(ckpt_l)
    a = fx.build_prompt(processor_l, "a", "Describe.", images=[fx.photo(640, 480, 10)])
    b = fx.build_prompt(processor_l, "b", "Describe.", images=[fx.photo(640, 480, 11)])
    assert a.input_ids == b.input_ids  # identical token ids: only the image hash tells them apart
    run_all(core, {0: [fx.request(a, "a", max_tokens=2)]})
    hits_before = core.stats.prefix_cache_hits
    run_all(core, {0: [fx.request(b, "b", max_tokens=2)]})
    image_offset = b.media[0].offset
    assert core.stats.prefix_cache_hits - hits_before <= image_offset


def test_encoder_cache_skips_the_vision_tower_for_a_repeated_image(ckpt_l, prompts_l):
    core = make_core(ckpt_l, enable_prefix_caching=False)  # so the prompt must really be recomputed
    image = prompts_l[1]
    run_all(core, {0: [fx.request(image, "a", max_tokens=2)]})
    tiles = core.stats.num_encoded_tiles
    assert tiles == image.media[0].num_tiles
    calls = []
    original = core.runner.model.encode_media
    core.runner.model.encode_media = lambda px: calls.append(px.shape[0]) or original(px)
    out = run_all(core, {0: [fx.request(image, "b", max_tokens=2)]})
    assert calls == [] and core.stats.num_encoded_tiles == tiles
    assert len(out["b"]) == 2


def test_preemption_under_a_tiny_pool_gives_identical_outputs(ckpt_l, prompts_l, hf_tokens_l):
    # Six short prompts fit the pool together, but their 16 outputs each do not: decodes must preempt.
    chosen = [prompts_l[0], prompts_l[4]] * 3
    blocks = lambda n: -(-n // 16)
    pool = sum(blocks(len(p.input_ids)) for p in chosen) + 2
    assert pool < sum(blocks(len(p.input_ids) + 16) for p in chosen)
    core = make_core(ckpt_l, num_kv_blocks=pool, enable_prefix_caching=False)
    reqs = [fx.request(p, f"p{i}", max_tokens=16, min_tokens=16) for i, p in enumerate(chosen)]
    got = run_all(core, {0: reqs})
    assert core.stats.num_preemptions > 0
    for i, p in enumerate(chosen):
        assert got[f"p{i}"] == hf_tokens_l[p.name]


def test_abort_mid_prefill_and_mid_decode_returns_every_block(ckpt_l, prompts_l):
    core = make_core(ckpt_l, max_num_batched_tokens=256)
    total_free = core.scheduler.block_manager.num_free_blocks
    core.add_request(fx.request(prompts_l[1], "prefill", max_tokens=8))
    core.add_request(fx.request(prompts_l[0], "decode", max_tokens=50, min_tokens=50))
    for _ in range(3):
        core.step()
    outs = core.abort_request("prefill")  # its 1.3k-token prompt is still being prefilled in 256-token chunks
    assert [o.finish_reason for o in outs] == [FinishReason.ABORT]
    while not core.scheduler.running or core.scheduler.running[0].num_output_tokens < 3:
        core.step()
    assert [o.finish_reason for o in core.abort_request("decode")] == [FinishReason.ABORT]
    assert core.abort_request("decode") == []  # idempotent
    assert not core.has_unfinished()
    core.scheduler.check_integrity()
    bm = core.scheduler.block_manager
    assert bm.num_free_blocks == total_free and bm.usage == 0.0


def test_logprobs_equal_the_reference_log_softmax(ckpt_l, prompts_l):
    core = make_core(ckpt_l)
    prompt = prompts_l[0]
    core.add_request(fx.request(prompt, "lp", max_tokens=1, logprobs=3))
    (out,) = _first_output(core)
    model = reference.load_hf_model(ckpt_l)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt.input_ids])).logits[0, -1]
    ref = torch.log_softmax(logits.double(), -1)
    (lp,) = out.logprobs
    assert lp.token_id == int(ref.argmax())
    assert abs(lp.logprob - float(ref[lp.token_id])) < 1e-4
    top_ids = [t[0] for t in lp.top]
    assert top_ids == ref.topk(3).indices.tolist()
    for tid, _, value in lp.top:
        assert abs(value - float(ref[tid])) < 1e-4


def _first_output(core):
    while True:
        outs = core.step()
        if outs:
            return outs


def test_n_choices_share_the_prompt_and_seeded_sampling_is_reproducible(ckpt_l, prompts_l):
    prompt = prompts_l[1]
    params = dict(max_tokens=6, min_tokens=6, temperature=1.0, seed=1234, n=3)
    core = make_core(ckpt_l)
    core.add_request(fx.request(prompt, "n3", **params))
    choices: dict[int, list[int]] = {0: [], 1: [], 2: []}
    while core.has_unfinished():
        for out in core.step():
            choices[out.index].extend(out.token_ids)
    assert all(len(c) == 6 for c in choices.values())
    assert (
        core.stats.prefix_cache_hits >= 2 * (len(prompt.input_ids) // 16 - 1) * 16
    )  # children reuse the prompt
    # Same seed, different batch companions: same tokens.
    other = make_core(ckpt_l)
    other.add_request(fx.request(prompts_l[0], "noise", max_tokens=6, temperature=1.0))
    other.add_request(fx.request(prompt, "n3", **params))
    again: dict[int, list[int]] = {0: [], 1: [], 2: []}
    while other.has_unfinished():
        for out in other.step():
            if out.request_id == "n3":
                again[out.index].extend(out.token_ids)
    assert again == choices


def test_stop_string_ends_the_choice_and_is_not_emitted(ckpt_l, prompts_l, hf_tokens_l):
    core = make_core(ckpt_l)
    tokens = hf_tokens_l["text"]
    full = core.tokenizer.decode(tokens[:10])
    # A 3-character stop string from the middle of the reference text (min_tokens masks EOS, not stop strings).
    middle = len(full) // 2
    stop = next(full[i : i + 3] for i in range(middle, len(full) - 2) if full[i : i + 3].strip())
    core.add_request(fx.request(prompts_l[0], "s", max_tokens=16, min_tokens=16, stop=[stop]))
    text, reason = "", None
    while core.has_unfinished():
        for out in core.step():
            text += out.text
            reason = out.finish_reason or reason
    assert reason == FinishReason.STOP
    assert stop not in text and full.startswith(text) and len(text) == full.index(stop)


def test_a_prompt_with_more_media_than_the_encoder_cache_holds(ckpt_l, processor_l):
    # 8 images x 5 tiles = 10,240 embedding rows through a cache of 9,472 rows and an 8-tile encoder budget:
    # images are encoded as the prefill reaches them and released once it has passed them.
    prompt = fx.build_prompt(processor_l, "many", "All?", images=[fx.photo(640, 480, i) for i in range(8)])
    assert sum(m.length for m in prompt.media) > 9472
    core = make_core(ckpt_l, num_kv_blocks=1024, encoder_cache_tokens=9472, max_encoder_tiles_per_step=8)
    got = run_all(core, {0: [fx.request(prompt, "many", max_tokens=6, min_tokens=6)]})
    assert got["many"] == fx.hf_greedy(reference.load_hf_model(ckpt_l), prompt, 6)
    assert core.stats.num_encoded_tiles == 40


def test_media_placeholders_are_checked_against_the_models_tokens_per_tile(ckpt_l, prompts_l):
    core = make_core(ckpt_l)
    image = next(p for p in prompts_l if p.name == "image")
    req = fx.request(image, "short", max_tokens=2)
    item = req.mm_inputs[0]
    req.mm_inputs = [dataclasses.replace(item, length=item.length - 1)]
    with pytest.raises(RequestRejectedError, match="embeddings per tile"):
        core.add_request(req)
    assert not core.has_unfinished()
