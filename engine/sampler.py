"""Batched sampling on the device: one vectorized pass for the whole batch (CPU or CUDA).

Public API:
    batch = SamplingBatch.from_sequences(seqs, vocab_size, device, eos_token_ids=eos)  # row i = seqs[i]
    out = Sampler()(logits, batch)   # logits: [B, V] float32, row i = last position of seqs[i]
    out.token_ids: list[int]         # one host sync for the whole batch
    out.logprobs: list[(logprob, [(token_id, logprob), ...best first]) | None] | None

Pipeline (order matters; it follows vLLM / HF):
  1. raw logprobs = log_softmax(logits) of the *unprocessed* model distribution (OpenAI's and vLLM's
     default "raw logprobs"): the sampled token's logprob and the top-k alternatives are reported from
     it, whatever penalties or temperature did to the sampling distribution.
  2. min_tokens: EOS (unless ignore_eos) and stop_token_ids get -inf while fewer outputs exist.
  3. logit_bias is added.
  4. penalties: repetition (HF: over prompt + output tokens, divide positive logits and multiply
     negative ones), then frequency / presence (OpenAI: over output tokens,
     `logit -= frequency * count + presence * (count > 0)`).
  5. greedy rows (temperature 0 or top_k 1): argmax. Other rows: / temperature, then min_p (on the
     full distribution), top_k, top_p (on the top-k renormalized distribution), then a draw by the
     exponential trick argmax(p / q), q ~ Exp(1). Seeded rows draw q from their own torch.Generator
     (seeded from (seed, choice index)), so they reproduce whatever else is in the batch.
Work is skipped for features no row uses (an all-greedy batch is one argmax).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch

from plm_serve.engine.sequence import Sequence

RowLogprobs = tuple[float, list[tuple[int, float]]]  # (sampled token's logprob, top alternatives)
_TINY = torch.finfo(torch.float32).tiny


@dataclass(slots=True)
class SamplingBatch:
    """Per-row sampling parameters as device tensors; None means "no row uses this feature"."""

    size: int
    device: torch.device
    all_greedy: bool = True
    greedy: torch.Tensor | None = None  # [B] bool
    temperature: torch.Tensor | None = None  # [B] float32, 1.0 on greedy rows
    top_k: torch.Tensor | None = None  # [B] int64, vocab size where disabled
    top_p: torch.Tensor | None = None  # [B] float32
    min_p: torch.Tensor | None = None  # [B] float32
    repetition: torch.Tensor | None = None  # [B] float32
    seen: torch.Tensor | None = None  # [B, V] bool: token in prompt + output (repetition rows)
    frequency: torch.Tensor | None = None  # [B] float32
    presence: torch.Tensor | None = None  # [B] float32
    counts: torch.Tensor | None = None  # [B, V] float32: output token counts (frequency/presence rows)
    bias: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # rows, token ids, values
    banned: tuple[torch.Tensor, torch.Tensor] | None = None  # rows, token ids (min_tokens)
    generators: dict[int, torch.Generator] = field(default_factory=dict)  # row -> RNG (seeded rows)
    logprobs: list[int | None] = field(default_factory=list)  # per row: top-k count, None = off
    max_logprobs: int = -1  # -1: no row wants logprobs

    @classmethod
    def from_sequences(
        cls,
        seqs: list[Sequence],
        vocab_size: int,
        device: torch.device | str,
        eos_token_ids: Iterable[int] = (),
    ) -> SamplingBatch:
        """Build the batch for `seqs` (row i = seqs[i]). `eos_token_ids` are masked under min_tokens."""
        device = torch.device(device)
        batch = cls(size=len(seqs), device=device)
        params = [s.sampling for s in seqs]
        batch.logprobs = [p.logprobs for p in params]
        batch.max_logprobs = max((k for k in batch.logprobs if k is not None), default=-1)
        if not all(p.greedy for p in params):
            _set_random_params(batch, seqs)
        _set_penalties(batch, seqs, vocab_size)
        _set_bias_and_bans(batch, seqs, vocab_size, frozenset(eos_token_ids))
        return batch


def _tensor(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype).to(device, non_blocking=True)


def _set_random_params(batch: SamplingBatch, seqs: list[Sequence]) -> None:
    params = [s.sampling for s in seqs]
    device = batch.device
    batch.all_greedy = False
    greedy = [p.greedy for p in params]
    batch.greedy = _tensor(greedy, torch.bool, device)
    temperature = [1.0 if g else p.temperature for p, g in zip(params, greedy, strict=True)]
    batch.temperature = _tensor(temperature, torch.float32, device)
    if any(p.top_k > 1 for p in params):
        batch.top_k = _tensor([p.top_k if p.top_k > 0 else 2**62 for p in params], torch.int64, device)
    if any(p.top_p < 1.0 for p in params):
        # Disabled rows get 2.0, not 1.0: float rounding of the cumulative sum must not trim their tail.
        batch.top_p = _tensor([p.top_p if p.top_p < 1.0 else 2.0 for p in params], torch.float32, device)
    if any(p.min_p > 0.0 for p in params):
        batch.min_p = _tensor([p.min_p for p in params], torch.float32, device)
    for row, (seq, g) in enumerate(zip(seqs, greedy, strict=True)):
        if seq.sampling.seed is not None and not g:
            batch.generators[row] = _generator(seq, device)


def _generator(seq: Sequence, device: torch.device) -> torch.Generator:
    """The sequence's own RNG, created once on `device`; its state advances with every draw."""
    if seq.generator is None or seq.generator.device != device:
        key = f"{seq.sampling.seed}:{seq.index}".encode()
        seed = int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") >> 1
        seq.generator = torch.Generator(device=device).manual_seed(seed)
    return seq.generator


def _set_penalties(batch: SamplingBatch, seqs: list[Sequence], vocab_size: int) -> None:
    params = [s.sampling for s in seqs]
    rep_rows = [i for i, p in enumerate(params) if p.repetition_penalty != 1.0]
    out_rows = [i for i, p in enumerate(params) if p.frequency_penalty != 0.0 or p.presence_penalty != 0.0]
    shape, device = (len(seqs), vocab_size), batch.device
    if rep_rows:
        batch.repetition = _tensor([p.repetition_penalty for p in params], torch.float32, device)
        rows, ids = _flatten(seqs, rep_rows, prompt=True)
        batch.seen = torch.zeros(shape, dtype=torch.bool, device=device)
        batch.seen[_tensor(rows, torch.int64, device), _tensor(ids, torch.int64, device)] = True
    if out_rows:
        batch.frequency = _tensor([p.frequency_penalty for p in params], torch.float32, device)
        batch.presence = _tensor([p.presence_penalty for p in params], torch.float32, device)
        rows, ids = _flatten(seqs, out_rows, prompt=False)
        batch.counts = torch.zeros(shape, dtype=torch.float32, device=device)
        ones = torch.ones(len(ids), dtype=torch.float32, device=device)
        index = (_tensor(rows, torch.int64, device), _tensor(ids, torch.int64, device))
        batch.counts.index_put_(index, ones, accumulate=True)


def _flatten(seqs: list[Sequence], rows: list[int], prompt: bool) -> tuple[list[int], list[int]]:
    """(row, token id) pairs of the given rows' tokens: prompt + output, or output only."""
    flat_rows: list[int] = []
    flat_ids: list[int] = []
    for row in rows:
        seq = seqs[row]
        ids = seq.token_ids if prompt else seq.token_ids[seq.num_prompt_tokens :]
        flat_rows.extend([row] * len(ids))
        flat_ids.extend(ids)
    return flat_rows, flat_ids


def _set_bias_and_bans(
    batch: SamplingBatch, seqs: list[Sequence], vocab_size: int, eos: frozenset[int]
) -> None:
    bias_rows, bias_ids, bias_values, ban_rows, ban_ids = [], [], [], [], []
    for row, seq in enumerate(seqs):
        p = seq.sampling
        for token, value in p.logit_bias.items():
            if 0 <= token < vocab_size:  # out-of-range ids would crash the device kernel
                bias_rows.append(row)
                bias_ids.append(token)
                bias_values.append(value)
        if p.min_tokens and seq.num_output_tokens < p.min_tokens:
            stops = set(p.stop_token_ids) if p.ignore_eos else eos.union(p.stop_token_ids)
            stops = [t for t in stops if 0 <= t < vocab_size]
            ban_rows.extend([row] * len(stops))
            ban_ids.extend(stops)
    device = batch.device
    if bias_rows:
        batch.bias = (
            _tensor(bias_rows, torch.int64, device),
            _tensor(bias_ids, torch.int64, device),
            _tensor(bias_values, torch.float32, device),
        )
    if ban_rows:
        batch.banned = (_tensor(ban_rows, torch.int64, device), _tensor(ban_ids, torch.int64, device))


@dataclass(slots=True)
class SamplerOutput:
    token_ids: list[int]
    logprobs: list[RowLogprobs | None] | None = None  # None when no row asked for logprobs


class Sampler:
    """Stateless; see the module docstring for the pipeline."""

    def __call__(self, logits: torch.Tensor, batch: SamplingBatch, consume: bool = False) -> SamplerOutput:
        # logits: [B, V] float32. The caller's tensor is not modified unless it hands it over with `consume=True`
        # (the model runner does: it saves a [B, V] copy per step, 32 MB at B = 64).
        assert logits.shape[0] == batch.size, "one row of logits per sequence"
        logits = logits.float()
        raw = torch.log_softmax(logits, dim=-1) if batch.max_logprobs >= 0 else None
        logits = _apply_bias_and_bans(logits, batch, inplace=consume)
        logits = _apply_penalties(logits, batch)
        if batch.all_greedy:
            tokens = logits.argmax(dim=-1)
        else:
            tokens = _sample(logits, batch)
        token_ids = tokens.tolist()
        logprobs = _gather_logprobs(raw, tokens, batch) if raw is not None else None
        return SamplerOutput(token_ids, logprobs)


def _apply_bias_and_bans(logits: torch.Tensor, batch: SamplingBatch, inplace: bool) -> torch.Tensor:
    if batch.bias is None and batch.banned is None:
        return logits
    if not inplace:
        logits = logits.clone()
    if batch.bias is not None:
        rows, ids, values = batch.bias
        logits.index_put_((rows, ids), values, accumulate=True)
    if batch.banned is not None:
        logits[batch.banned] = float("-inf")
    return logits


def _apply_penalties(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    if batch.seen is not None:
        penalty = batch.repetition[:, None]
        scaled = torch.where(logits > 0, logits / penalty, logits * penalty)
        logits = torch.where(batch.seen, scaled, logits)
    if batch.counts is not None:
        counts = batch.counts
        logits = logits - batch.frequency[:, None] * counts - batch.presence[:, None] * (counts > 0)
    return logits


def _sample(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """Tokens for a batch with at least one non-greedy row: [B] int64."""
    greedy_tokens = logits.argmax(dim=-1)
    logits = logits / batch.temperature[:, None]
    logits = _apply_filters(logits, batch)
    probs = torch.softmax(logits, dim=-1)
    q = torch.empty_like(probs).exponential_()
    for row, generator in batch.generators.items():  # the only per-row loop: seeded rows
        q[row].exponential_(generator=generator)
    sampled = (probs / q.clamp_min_(_TINY)).argmax(dim=-1)
    return torch.where(batch.greedy, greedy_tokens, sampled)


def _apply_filters(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """min_p, then top_k and top_p (one descending sort shared by both)."""
    neg_inf = float("-inf")
    if batch.min_p is not None:
        probs = torch.softmax(logits, dim=-1)
        threshold = batch.min_p[:, None] * probs.amax(dim=-1, keepdim=True)
        logits = logits.masked_fill(probs < threshold, neg_inf)
    if batch.top_k is None and batch.top_p is None:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    ranks = torch.arange(logits.shape[-1], device=logits.device)
    drop = torch.zeros_like(sorted_logits, dtype=torch.bool)
    if batch.top_k is not None:
        drop |= ranks[None, :] >= batch.top_k[:, None]
    if batch.top_p is not None:
        probs = torch.softmax(sorted_logits.masked_fill(drop, neg_inf), dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs  # keep the smallest prefix reaching top_p
        drop |= mass_before >= batch.top_p[:, None]
    drop = torch.zeros_like(drop).scatter_(1, order, drop)
    return logits.masked_fill(drop, neg_inf)


def _gather_logprobs(raw: torch.Tensor, tokens: torch.Tensor, batch: SamplingBatch) -> list:
    sampled = raw.gather(1, tokens[:, None]).squeeze(1).tolist()
    top_values: list[list[float]] = [[] for _ in range(batch.size)]
    top_ids: list[list[int]] = [[] for _ in range(batch.size)]
    if batch.max_logprobs > 0:
        top = raw.topk(batch.max_logprobs, dim=-1)
        top_values, top_ids = top.values.tolist(), top.indices.tolist()
    out: list[RowLogprobs | None] = []
    for row, k in enumerate(batch.logprobs):
        if k is None:
            out.append(None)
        else:
            out.append((sampled[row], list(zip(top_ids[row][:k], top_values[row][:k], strict=True))))
    return out
