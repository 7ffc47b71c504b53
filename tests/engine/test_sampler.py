"""Sampler: greedy, filters, seeded reproducibility, penalties, logit bias, min_tokens, raw logprobs."""

from __future__ import annotations

import math

import pytest
import torch

from plm_serve.engine.request import SamplingParams
from plm_serve.engine.sampler import (
    Sampler,
    SamplingBatch,
    _apply_bias_and_bans,
    _apply_filters,
    _apply_penalties,
)
from plm_serve.engine.sequence import Sequence

V = 32
EOS = 3
CPU = torch.device("cpu")


def make_seq(prompt=(5, 6, 7), outputs=(), index: int = 0, seq_id: int = 0, **sampling) -> Sequence:
    sampling.setdefault("max_tokens", 100)
    return Sequence(
        seq_id=seq_id,
        request_id=f"r{seq_id}",
        index=index,
        token_ids=[*prompt, *outputs],
        num_prompt_tokens=len(prompt),
        sampling=SamplingParams(**sampling),
    )


def batch_of(seqs, device=CPU) -> SamplingBatch:
    return SamplingBatch.from_sequences(seqs, V, device, eos_token_ids={EOS})


def random_logits(rows: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, V, generator=torch.Generator().manual_seed(seed)) * 3


def test_greedy_and_top_k_1_are_argmax() -> None:
    logits = random_logits(6)
    seqs = [make_seq(temperature=0.0) for _ in range(3)] + [
        make_seq(temperature=1.5, top_k=1) for _ in range(3)
    ]
    batch = batch_of(seqs)
    assert batch.all_greedy
    assert Sampler()(logits, batch).token_ids == logits.argmax(-1).tolist()


def test_greedy_rows_stay_argmax_in_a_mixed_batch() -> None:
    logits = random_logits(4)
    seqs = [
        make_seq(temperature=0.0),
        make_seq(temperature=1.0),
        make_seq(temperature=0.0),
        make_seq(top_p=0.5),
    ]
    batch = batch_of(seqs)
    assert not batch.all_greedy
    tokens = Sampler()(logits, batch).token_ids
    assert tokens[0] == logits[0].argmax() and tokens[2] == logits[2].argmax()


def test_seeded_rows_reproduce_whatever_the_batch() -> None:
    logits = random_logits(1, seed=1).expand(5, V).contiguous()
    alone = make_seq(seed=42, temperature=1.0)
    alone_tokens = [Sampler()(logits[:1], batch_of([alone])).token_ids[0] for _ in range(20)]

    seeded = make_seq(seed=42, temperature=1.0, seq_id=1)
    others = [make_seq(temperature=1.0, seq_id=2), make_seq(seed=7, temperature=0.7, top_k=5, seq_id=3)]
    batch_tokens = []
    for i in range(20):
        rows = [others[0], seeded, others[1]] if i % 2 else [seeded, *others, make_seq(temperature=0.0)]
        out = Sampler()(logits[: len(rows)], batch_of(rows)).token_ids
        batch_tokens.append(out[rows.index(seeded)])
    assert batch_tokens == alone_tokens
    assert len(set(alone_tokens)) > 1  # it really samples


def test_seed_depends_on_the_choice_index() -> None:
    logits = random_logits(1, seed=2)
    draws = []
    for index in (0, 1):
        seq = make_seq(seed=5, index=index, temperature=1.0)
        draws.append([Sampler()(logits, batch_of([seq])).token_ids[0] for _ in range(10)])
    assert draws[0] != draws[1]


def test_sampling_follows_the_distribution() -> None:
    probs = torch.tensor([0.75, 0.25] + [0.0] * (V - 2))
    logits = probs.log().expand(4000, V).contiguous()
    tokens = torch.tensor(Sampler()(logits, batch_of([make_seq(temperature=1.0)] * 4000)).token_ids)
    assert set(tokens.tolist()) <= {0, 1}
    assert (tokens == 0).float().mean().item() == pytest.approx(0.75, abs=0.03)


def hand_made() -> torch.Tensor:
    probs = torch.tensor([0.5, 0.25, 0.125, 0.0625, 0.0625] + [0.0] * (V - 5))
    return probs.log()[None, :]


@pytest.mark.parametrize(
    ("sampling", "kept"),
    [
        ({"top_p": 0.75}, [0, 1]),
        ({"top_p": 0.76}, [0, 1, 2]),
        ({"top_p": 0.1}, [0]),
        ({"top_k": 2}, [0, 1]),
        ({"top_k": 4}, [0, 1, 2, 3]),
        ({"top_k": 3, "top_p": 0.9}, [0, 1, 2]),  # top_p on the top-3 renormalized: 0.57, 0.29, 0.14
        ({"top_k": 3, "top_p": 0.8}, [0, 1]),
        ({"min_p": 0.3}, [0, 1]),  # threshold 0.15
        ({"min_p": 0.2}, [0, 1, 2]),  # threshold 0.1
        ({}, [0, 1, 2, 3, 4]),
    ],
)
def test_filters_on_a_hand_made_distribution(sampling: dict, kept: list[int]) -> None:
    batch = batch_of([make_seq(temperature=1.0, **sampling)])
    filtered = _apply_filters(hand_made(), batch)
    assert torch.isfinite(filtered[0]).nonzero().flatten().tolist() == kept
    draws = Sampler()(
        hand_made().expand(500, V).contiguous(), batch_of([make_seq(temperature=1.0, **sampling)] * 500)
    )
    assert set(draws.token_ids) <= set(kept)


def reference_penalties(logits: torch.Tensor, seq: Sequence) -> torch.Tensor:
    """Straightforward per-token loops: HF repetition penalty, OpenAI frequency/presence penalties."""
    sp = seq.sampling
    out = logits.clone()
    for token in set(seq.token_ids):
        value = out[token].item()
        out[token] = value / sp.repetition_penalty if value > 0 else value * sp.repetition_penalty
    outputs = seq.output_token_ids
    for token in set(outputs):
        count = outputs.count(token)
        out[token] -= sp.frequency_penalty * count + sp.presence_penalty
    return out


def test_penalties_match_a_reference() -> None:
    seqs = [
        make_seq(prompt=(1, 2, 3, 4), outputs=(4, 5, 5, 9), repetition_penalty=1.3, seq_id=0),
        make_seq(prompt=(1, 2), outputs=(7, 7, 7, 2), frequency_penalty=0.5, presence_penalty=1.5, seq_id=1),
        make_seq(prompt=(6,), outputs=(6, 8), repetition_penalty=0.8, frequency_penalty=-0.3, seq_id=2),
        make_seq(prompt=(1, 2), outputs=(3,), seq_id=3),  # no penalty
    ]
    logits = random_logits(4, seed=3)
    got = _apply_penalties(logits, batch_of(seqs))
    for row, seq in enumerate(seqs):
        torch.testing.assert_close(got[row], reference_penalties(logits[row], seq))


def test_logit_bias_and_min_tokens() -> None:
    logits = torch.zeros(3, V)
    logits[:, EOS] = 10.0
    logits[:, 9] = 5.0
    seqs = [
        make_seq(logit_bias={11: 100.0, 12: -5.0, 10_000: 1.0}, seq_id=0),  # out-of-vocab id ignored
        make_seq(min_tokens=2, outputs=(1,), stop_token_ids=[9], seq_id=1),
        make_seq(min_tokens=2, outputs=(1, 1), seq_id=2),  # min_tokens reached: EOS allowed again
    ]
    batch = batch_of(seqs)
    processed = _apply_bias_and_bans(logits, batch, inplace=False)
    assert processed[0, 11] == 100.0 and processed[0, 12] == -5.0
    assert processed[1, EOS] == -math.inf and processed[1, 9] == -math.inf
    assert torch.equal(processed[2], logits[2])
    assert Sampler()(logits, batch).token_ids == [11, 0, EOS]
    assert logits[0, 11] == 0.0  # the caller's logits are untouched
    handed_over = logits.clone()
    assert Sampler()(handed_over, batch, consume=True).token_ids == [11, 0, EOS]  # same tokens, no copy


def test_min_tokens_with_ignore_eos_masks_only_stop_ids() -> None:
    batch = batch_of([make_seq(min_tokens=1, ignore_eos=True, stop_token_ids=[9])])
    processed = _apply_bias_and_bans(torch.zeros(1, V), batch, inplace=True)
    assert torch.isinf(processed[0]).nonzero().flatten().tolist() == [9]


def test_logprobs_are_the_raw_model_distribution() -> None:
    logits = random_logits(3, seed=4)
    seqs = [
        make_seq(logprobs=3, temperature=0.7, repetition_penalty=1.5, seq_id=0),
        make_seq(seq_id=1),
        make_seq(logprobs=0, seq_id=2),
    ]
    out = Sampler()(logits, batch_of(seqs))
    reference = torch.log_softmax(logits, dim=-1)
    lp, top = out.logprobs[0]
    assert lp == pytest.approx(reference[0, out.token_ids[0]].item(), abs=1e-6)
    values, ids = reference[0].topk(3)
    assert [t for t, _ in top] == ids.tolist()
    assert [v for _, v in top] == pytest.approx(values.tolist(), abs=1e-6)
    assert out.logprobs[1] is None
    assert out.logprobs[2] == (pytest.approx(reference[2].max().item(), abs=1e-6), [])
    assert Sampler()(logits[:1], batch_of([make_seq()])).logprobs is None


@pytest.mark.gpu
def test_cuda_matches_cpu_for_greedy_and_seeded_reproducibility() -> None:
    cuda = torch.device("cuda")
    logits = random_logits(4, seed=5)
    seqs = [make_seq(seed=1, temperature=1.0, top_p=0.9, seq_id=i) for i in range(4)]
    greedy = [make_seq(temperature=0.0, repetition_penalty=1.2, seq_id=i) for i in range(4)]
    assert (
        Sampler()(logits.to(cuda), batch_of(greedy, cuda)).token_ids
        == Sampler()(logits, batch_of(greedy)).token_ids
    )
    first = Sampler()(logits.to(cuda), batch_of(seqs, cuda)).token_ids
    again = [make_seq(seed=1, temperature=1.0, top_p=0.9, seq_id=i) for i in range(4)]
    assert Sampler()(logits.to(cuda), batch_of(again, cuda)).token_ids == first
