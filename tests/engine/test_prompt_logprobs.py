"""Prompt logprobs: equal to transformers' log-softmax over the same prompt (fp32), chunk by chunk, also for a
prompt whose blocks another request already cached and through a preemption."""

from __future__ import annotations

import pytest
import torch

from plm_serve.engine import prompt_logprobs
from tests import reference
from tests.engine import engine_fixtures as fx
from tests.engine.test_engine_generation import make_core


@pytest.fixture(scope="module")
def processor_l(ckpt_l):
    return reference.load_hf_processor(ckpt_l)


@pytest.fixture(scope="module")
def hf_model(ckpt_l):
    return reference.load_hf_model(ckpt_l)


def reference_scores(model, prompt: fx.Prompt) -> torch.Tensor:
    """log_softmax of transformers' fp32 logits, [P - 1, V]: row p - 1 scores prompt token p."""
    kwargs = {"pixel_values": prompt.pixel_values} if prompt.pixel_values is not None else {}
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt.input_ids]), **kwargs).logits[0, :-1]
    return torch.log_softmax(logits, dim=-1)


def first_outputs(core, request_ids: set[str]) -> dict:
    firsts = {}
    while core.has_unfinished():
        for out in core.step():
            if out.request_id in request_ids and out.request_id not in firsts:
                firsts[out.request_id] = out
    return firsts


def check_against_reference(scores, ref: torch.Tensor, prompt: fx.Prompt, k: int) -> None:
    assert scores[0] is None and len(scores) == len(prompt.input_ids)
    entries = scores[1:]
    targets = torch.tensor(prompt.input_ids[1:])
    assert [e.token_id for e in entries] == targets.tolist()
    want = ref.gather(1, targets[:, None])  # [P - 1, 1]
    got = torch.tensor([e.logprob for e in entries], dtype=torch.float32)
    assert (got - want[:, 0]).abs().max() < 1e-4
    # The rank, up to tokens within float noise of the scored one.
    ranks = torch.tensor([e.rank for e in entries])
    assert ((ref > want + 1e-4).sum(dim=1) + 1 <= ranks).all()
    assert (ranks <= (ref >= want - 1e-4).sum(dim=1)).all()
    assert [len(e.top) for e in entries] == [k] * len(entries)
    if k:
        assert [[tid for tid, _, _ in e.top] for e in entries] == ref.topk(k).indices.tolist()


def test_text_and_image_prompts_equal_transformers_under_chunked_prefill(ckpt_l, processor_l, hf_model):
    text = fx.build_prompt(processor_l, "text", "Score every token of this sentence, please.")
    image = fx.build_prompt(processor_l, "image", "Describe.", images=[fx.photo(64, 64, 3)])
    # A 256-token budget splits the image prompt (1.3k tokens) into several chunks; slices of 128 rows inside.
    core = make_core(ckpt_l, max_num_batched_tokens=256)
    core.add_request(fx.request(text, "t", max_tokens=2, prompt_logprobs=2))
    core.add_request(fx.request(image, "i", max_tokens=1, prompt_logprobs=1))
    firsts = first_outputs(core, {"t", "i"})
    check_against_reference(firsts["t"].prompt_logprobs, reference_scores(hf_model, text), text, 2)
    check_against_reference(firsts["i"].prompt_logprobs, reference_scores(hf_model, image), image, 1)
    core.scheduler.check_integrity()


def test_a_cached_prefix_is_still_scored(ckpt_l, processor_l, hf_model):
    prompt = fx.build_prompt(processor_l, "text", "The same prompt twice: " + "word " * 40)
    core = make_core(ckpt_l)
    first_outputs(core, set())
    core.add_request(fx.request(prompt, "warm", max_tokens=1))
    first_outputs(core, set())
    hits = core.stats.prefix_cache_hits
    core.add_request(fx.request(prompt, "scored", max_tokens=1, prompt_logprobs=0))
    scores = first_outputs(core, {"scored"})["scored"].prompt_logprobs
    assert core.stats.prefix_cache_hits == hits  # computed, not read from the cache
    check_against_reference(scores, reference_scores(hf_model, prompt), prompt, 0)


def test_only_choice_zero_carries_them_and_later_outputs_do_not(ckpt_l, processor_l):
    prompt = fx.build_prompt(processor_l, "text", "Two choices.")
    core = make_core(ckpt_l)
    core.add_request(fx.request(prompt, "n2", max_tokens=3, min_tokens=3, n=2, prompt_logprobs=0))
    outs = []
    while core.has_unfinished():
        outs.extend(core.step())
    carrying = [(o.index, o.num_output_tokens) for o in outs if o.prompt_logprobs is not None]
    assert carrying == [(0, 1)]
    assert not core.prompt_logprobs._pending  # nothing left behind


def test_scores_survive_a_preemption_mid_prefill(ckpt_l, processor_l, hf_model, monkeypatch):
    prompt = fx.build_prompt(processor_l, "text", "Preempt me " * 30)
    core = make_core(ckpt_l, max_num_batched_tokens=64, max_num_seqs=8, enable_prefix_caching=False)
    monkeypatch.setattr(prompt_logprobs, "ROWS_PER_SLICE", 16)
    core.add_request(fx.request(prompt, "p", max_tokens=1, prompt_logprobs=0))
    core.step()
    core.step()
    (seq,) = core.scheduler.running
    assert 0 < seq.num_computed_tokens < len(prompt.input_ids)
    core.scheduler._preempt(seq)  # what the scheduler does when blocks run out
    scores = first_outputs(core, {"p"})["p"].prompt_logprobs
    check_against_reference(scores, reference_scores(hf_model, prompt), prompt, 0)
