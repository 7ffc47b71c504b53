"""Sampler: greedy, filters, seeded reproducibility, penalties, logit bias, min_tokens, raw logprobs.

Rows are built the way the runner builds them: each sequence takes a slot of a `SamplingTable`, and a step's
rows are staged and uploaded (on the CPU the upload is free).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from plm_serve.engine.request import SamplingParams
from plm_serve.engine.sampler import (
    Sampler,
    SamplingTable,
    _apply_bias_and_bans,
    _apply_penalties,
    _nucleus_threshold,
    counter_uniform,
    logprobs_to_host,
)
from plm_serve.engine.scheduler_output import NewSequence
from plm_serve.engine.staging import HostStaging

V = 32
EOS = 3
CPU = torch.device("cpu")


@dataclass
class Seq:
    prompt: tuple[int, ...]
    outputs: tuple[int, ...]
    index: int
    sampling: SamplingParams


def make_seq(prompt=(5, 6, 7), outputs=(), index: int = 0, **sampling) -> Seq:
    sampling.setdefault("max_tokens", 100)
    return Seq(tuple(prompt), tuple(outputs), index, SamplingParams(**sampling))


def rows_of(seqs: list[Seq], device=CPU, extra_outputs: list[int] | None = None):
    """(table, rows): seqs[i] in slot i, sampling its next token (output position = its outputs so far)."""
    table = SamplingTable(len(seqs), V, device, eos_token_ids={EOS})
    for slot, s in enumerate(seqs):
        tokens = [*s.prompt, *s.outputs]
        table.admit(NewSequence(slot, slot, tokens, len(s.prompt), s.sampling, s.index, []))
    counters = [len(s.outputs) + (extra_outputs[i] if extra_outputs else 0) for i, s in enumerate(seqs)]
    return table, stage(table, list(range(len(seqs))), counters, device)


def stage(table: SamplingTable, slots: list[int], counters: list[int], device=CPU):
    step = HostStaging(device).begin()
    as_array = lambda values: np.asarray(values, dtype=np.int64)
    pending = table.stage(step, as_array(slots), as_array([0] * len(slots)), as_array(counters))
    step.upload()
    return pending.finish()


def sample(logits: torch.Tensor, seqs: list[Seq], **kwargs) -> list[int]:
    return Sampler()(logits, rows_of(seqs, **kwargs)[1]).token_ids.tolist()


def random_logits(rows: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, V, generator=torch.Generator().manual_seed(seed)) * 3


def test_greedy_and_top_k_1_are_argmax() -> None:
    logits = random_logits(6)
    seqs = [make_seq(temperature=0.0) for _ in range(3)] + [
        make_seq(temperature=1.5, top_k=1) for _ in range(3)
    ]
    _, rows = rows_of(seqs)
    assert rows.all_greedy
    assert Sampler()(logits, rows).token_ids.tolist() == logits.argmax(-1).tolist()


def test_greedy_rows_stay_argmax_in_a_mixed_batch() -> None:
    logits = random_logits(4)
    seqs = [
        make_seq(temperature=0.0),
        make_seq(temperature=1.0),
        make_seq(temperature=0.0),
        make_seq(top_p=0.5),
    ]
    _, rows = rows_of(seqs)
    assert not rows.all_greedy
    tokens = Sampler()(logits, rows).token_ids.tolist()
    assert tokens[0] == logits[0].argmax() and tokens[2] == logits[2].argmax()


def test_seeded_rows_reproduce_whatever_the_batch() -> None:
    logits = random_logits(1, seed=1).expand(5, V).contiguous()
    seeded = make_seq(seed=42, temperature=1.0)
    alone = [sample(logits[:1], [seeded], extra_outputs=[i])[0] for i in range(20)]

    others = [make_seq(temperature=1.0), make_seq(seed=7, temperature=0.7, top_k=5)]
    in_batch = []
    for i in range(20):
        batch = [others[0], seeded, others[1]] if i % 2 else [seeded, *others, make_seq(temperature=0.0)]
        extra = [i if s is seeded else 3 for s in batch]
        in_batch.append(sample(logits[: len(batch)], batch, extra_outputs=extra)[batch.index(seeded)])
    assert in_batch == alone
    assert len(set(alone)) > 1  # it really samples


def test_seed_depends_on_the_choice_index() -> None:
    logits = random_logits(1, seed=2)
    draws = [[sample(logits, [make_seq(seed=5, index=i, temperature=1.0)], extra_outputs=[k])[0] for k in range(10)]
             for i in (0, 1)]  # fmt: skip
    assert draws[0] != draws[1]


def test_sampling_follows_the_distribution() -> None:
    probs = torch.tensor([0.75, 0.25] + [0.0] * (V - 2))
    logits = probs.log().expand(4000, V).contiguous()
    tokens = torch.tensor(sample(logits, [make_seq(temperature=1.0)] * 4000))
    assert set(tokens.tolist()) <= {0, 1}
    assert (tokens == 0).float().mean().item() == pytest.approx(0.75, abs=0.03)


def test_counter_uniform_is_a_pure_function_and_uniform() -> None:
    keys = torch.arange(20000, dtype=torch.int64) * 7919 + 2**40
    counters = torch.arange(20000, dtype=torch.int64) % 13
    u = counter_uniform(keys, counters)
    assert torch.equal(u, counter_uniform(keys.clone(), counters.clone()))
    assert float(u.min()) >= 0.0 and float(u.max()) < 1.0
    counts = torch.histc(u.float(), bins=10, min=0.0, max=1.0)
    assert float((counts - 2000).abs().max()) < 200  # ~4.5 sigma
    assert float(counter_uniform(keys[:1], counters[:1] + 1)) != float(u[0])


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
        ({"top_k": 3}, [0, 1, 2]),  # (top_k 4 would be a tie: tokens 3 and 4 have equal probability)
        ({"top_k": 3, "top_p": 0.9}, [0, 1, 2]),  # top_p on the top-3 renormalized: 0.57, 0.29, 0.14
        ({"top_k": 3, "top_p": 0.8}, [0, 1]),
        ({"min_p": 0.3}, [0, 1]),  # threshold 0.15
        ({"min_p": 0.2}, [0, 1, 2]),  # threshold 0.1
        ({"min_p": 0.2, "top_k": 5}, [0, 1, 2]),
        ({}, [0, 1, 2, 3, 4]),
    ],
)
def test_filters_on_a_hand_made_distribution(sampling: dict, kept: list[int]) -> None:
    draws = sample(hand_made().expand(600, V).contiguous(), [make_seq(temperature=1.0, **sampling)] * 600)
    assert set(draws) == set(kept)  # nothing outside, and (600 draws of p >= 1/16) everything inside


def test_sort_free_nucleus_equals_the_sorted_prefix() -> None:
    gen = torch.Generator().manual_seed(7)
    probs = torch.softmax(torch.randn(64, 1000, generator=gen) * 2, dim=-1)
    top_p = torch.rand(64, generator=gen) * 0.98 + 0.01
    keep = probs >= _nucleus_threshold(probs, top_p)
    sorted_p, order = probs.sort(dim=-1, descending=True)
    mass_before = sorted_p.cumsum(-1) - sorted_p
    want = torch.zeros_like(keep).scatter_(1, order, mass_before < top_p[:, None])
    assert torch.equal(keep, want)


def reference_penalties(logits: torch.Tensor, seq: Seq) -> torch.Tensor:
    """Straightforward per-token loops: HF repetition penalty, OpenAI frequency/presence penalties."""
    sp = seq.sampling
    out = logits.clone()
    for token in set(seq.prompt + seq.outputs):
        value = out[token].item()
        out[token] = value / sp.repetition_penalty if value > 0 else value * sp.repetition_penalty
    for token in set(seq.outputs):
        out[token] -= sp.frequency_penalty * seq.outputs.count(token) + sp.presence_penalty
    return out


PENALIZED = [
    make_seq(prompt=(1, 2, 3, 4), outputs=(4, 5, 5, 9), repetition_penalty=1.3),
    make_seq(prompt=(1, 2), outputs=(7, 7, 7, 2), frequency_penalty=0.5, presence_penalty=1.5),
    make_seq(prompt=(6,), outputs=(6, 8), repetition_penalty=0.8, frequency_penalty=-0.3),
    make_seq(prompt=(1, 2), outputs=(3,)),  # no penalty
]


def test_penalties_match_a_reference() -> None:
    logits = random_logits(4, seed=3)
    got = _apply_penalties(logits, rows_of(PENALIZED)[1])
    for row, seq in enumerate(PENALIZED):
        torch.testing.assert_close(got[row], reference_penalties(logits[row], seq))


def test_penalty_counts_are_incremental() -> None:
    # The counts are filled once at admission; afterwards each sampled token is added, never recounted.
    table, rows = rows_of(PENALIZED)
    new_tokens = torch.tensor([5, 11, 6, 0])
    table.record(rows, new_tokens)
    after = stage(table, [0, 1, 2, 3], [5, 5, 3, 2])
    logits = random_logits(4, seed=4)
    got = _apply_penalties(logits, after)
    for row, seq in enumerate(PENALIZED):
        grown = Seq(seq.prompt, (*seq.outputs, int(new_tokens[row])), seq.index, seq.sampling)
        torch.testing.assert_close(got[row], reference_penalties(logits[row], grown))


def test_logit_bias_and_min_tokens() -> None:
    logits = torch.zeros(3, V)
    logits[:, EOS] = 10.0
    logits[:, 9] = 5.0
    seqs = [
        make_seq(logit_bias={11: 100.0, 12: -5.0, 10_000: 1.0}),  # out-of-vocab id ignored
        make_seq(min_tokens=2, outputs=(1,), stop_token_ids=[9]),
        make_seq(min_tokens=2, outputs=(1, 1)),  # min_tokens reached: EOS allowed again
    ]
    _, rows = rows_of(seqs)
    processed = _apply_bias_and_bans(logits, rows, inplace=False)
    assert processed[0, 11] == 100.0 and processed[0, 12] == -5.0
    assert processed[1, EOS] == -math.inf and processed[1, 9] == -math.inf
    assert torch.equal(processed[2], logits[2])
    assert Sampler()(logits, rows).token_ids.tolist() == [11, 0, EOS]
    assert logits[0, 11] == 0.0  # the caller's logits are untouched
    handed_over = logits.clone()
    assert Sampler()(handed_over, rows, consume=True).token_ids.tolist() == [
        11,
        0,
        EOS,
    ]  # same tokens, no copy


def test_min_tokens_with_ignore_eos_masks_only_stop_ids() -> None:
    _, rows = rows_of([make_seq(min_tokens=1, ignore_eos=True, stop_token_ids=[9])])
    processed = _apply_bias_and_bans(torch.zeros(1, V), rows, inplace=True)
    assert torch.isinf(processed[0]).nonzero().flatten().tolist() == [9]


def test_logprobs_are_the_raw_model_distribution() -> None:
    logits = random_logits(3, seed=4)
    seqs = [make_seq(logprobs=3, temperature=0.7, repetition_penalty=1.5), make_seq(), make_seq(logprobs=0)]
    _, rows = rows_of(seqs)
    out = Sampler()(logits, rows)
    got = logprobs_to_host(rows.logprobs, out.logprob.tolist(), out.top_ids.tolist(), out.top_values.tolist())
    reference = torch.log_softmax(logits, dim=-1)
    tokens = out.token_ids.tolist()
    lp, top = got[0]
    assert lp == pytest.approx(reference[0, tokens[0]].item(), abs=1e-6)
    values, ids = reference[0].topk(3)
    assert [t for t, _ in top] == ids.tolist()
    assert [v for _, v in top] == pytest.approx(values.tolist(), abs=1e-6)
    assert got[1] is None
    assert got[2] == (pytest.approx(reference[2].max().item(), abs=1e-6), [])
    assert Sampler()(logits[:1], rows_of([make_seq()])[1]).logprob is None


@pytest.mark.gpu
def test_cuda_matches_cpu_for_greedy_and_seeded_reproducibility() -> None:
    cuda = torch.device("cuda")
    logits = random_logits(4, seed=5)
    seqs = [make_seq(seed=1, temperature=1.0, top_p=0.9, index=i) for i in range(4)]
    greedy = [make_seq(temperature=0.0, repetition_penalty=1.2, outputs=(i,)) for i in range(4)]
    assert sample(logits.to(cuda), greedy, device=cuda) == sample(logits, greedy)
    first = sample(logits.to(cuda), seqs, device=cuda)
    assert sample(logits.to(cuda), seqs, device=cuda) == first
    assert sample(logits, seqs) == first  # the counter-based draws do not depend on the device
