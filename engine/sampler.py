"""Sampling on the device from persistent per-slot parameters: nothing is rebuilt per step.

Public API:
    table = SamplingTable(num_slots, vocab_size, device, eos_token_ids)
    table.admit(new_sequence)                      # a sequence took a slot (host mirror + queued device rows)
    pending = table.stage(step, slots, counters)   # host half: staged with the step's other inputs
    step.upload(); rows = pending.finish()         # device half: SamplingRows for this step
    out = Sampler()(logits, rows)                  # logits [S, V] float32 -> SamplerOutput (device tensors)
    table.record(rows, out.token_ids)              # penalty counts of the new tokens (incremental)

Per slot, on the device: temperature, top_p, min_p, repetition / frequency / presence penalties, top_k, the
greedy flag and the RNG key; when any sequence uses penalties, `seen` [slots, V] (prompt + output tokens) and
`counts` [slots, V] (output tokens), filled once at admission and then bumped by each sampled token. Sparse
per-request settings (logit_bias, the stop ids masked under min_tokens) stay on the host and are staged only
for the rows that have them.

Pipeline per step (order matters; it follows vLLM / HF):
  1. raw logprobs = log_softmax(logits) of the *unprocessed* model distribution (OpenAI's and vLLM's
     default "raw logprobs"): the sampled token's logprob and the top-k alternatives are reported from
     it, whatever penalties or temperature did to the sampling distribution.
  2. min_tokens: EOS (unless ignore_eos) and stop_token_ids get -inf while fewer outputs exist.
  3. logit_bias is added.
  4. penalties: repetition (HF: over prompt + output tokens, divide positive logits and multiply
     negative ones), then frequency / presence (OpenAI: over output tokens,
     `logit -= frequency * count + presence * (count > 0)`).
  5. greedy rows (temperature 0 or top_k 1): argmax, bit-identical to argmax of the processed logits.
     Other rows: / temperature, then min_p (on the full distribution), top_k, top_p (on the top-k
     renormalized distribution), then one draw by inverse CDF.
No full-vocabulary sort: rows with top_k work on `torch.topk` candidates (sorted, so top_p there is the
usual prefix rule); rows with top_p but no top_k find the nucleus threshold by bisection on the probability
values (32 masked sums, exact up to ties: tokens tied with the last one kept are all kept).

Randomness is counter-based: the draw of a row is a hash of (the sequence's key, its output position), the key
being derived from (seed, choice index) for seeded requests and drawn from the engine's seeded generator at
admission otherwise. A seeded sequence therefore reproduces whatever else is in the batch, after a
preemption, and in the overlapped loop. (Seeded values differ from the earlier per-row torch.Generator
exponential draws: same distribution, different stream.)
Work is skipped for features no row uses (an all-greedy batch is one argmax).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch

from plm_serve.engine.scheduler_output import NewSequence
from plm_serve.engine.staging import StagedStep

RowLogprobs = tuple[float, list[tuple[int, float]]]  # (sampled token's logprob, top alternatives)

# Columns of the per-slot float table.
_TEMPERATURE, _TOP_P, _MIN_P, _REPETITION, _FREQUENCY, _PRESENCE = range(6)
_NUM_FLOAT = 6
_TOP_P_BISECTIONS = 32  # float32 bit patterns of probabilities in [0, 1] span < 2^31: 32 halvings are exact


@dataclass(slots=True)
class SamplingRows:
    """The S rows sampled in one step: device tensors, plus host flags that decide which work runs."""

    slots: torch.Tensor  # [S] int64, per-slot state rows
    write_pos: torch.Tensor  # [S] int64, position the sampled token takes in its sequence
    keys: torch.Tensor  # [S] int64 RNG key
    counters: torch.Tensor  # [S] int64 output position of the token being sampled (the RNG counter)
    params: torch.Tensor  # [S, 6] float32: temperature, top_p, min_p, repetition, frequency, presence
    top_k: torch.Tensor  # [S] int64, 0 = off
    greedy: torch.Tensor  # [S] bool
    all_greedy: bool
    topk_rows: torch.Tensor | None  # rows sampled among top-k candidates (non-greedy, top_k > 0)
    full_rows: torch.Tensor | None  # rows sampled over the whole vocabulary (non-greedy, no top_k)
    max_top_k: int
    use_top_p: bool
    use_min_p: bool
    use_repetition: bool
    use_frequency: bool
    bias: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None  # rows, token ids, values
    banned: tuple[torch.Tensor, torch.Tensor] | None  # rows, token ids (min_tokens)
    logprobs: list[int | None]  # per row: top-k count, None = off
    max_logprobs: int  # -1: no row wants logprobs
    seen: torch.Tensor | None = None  # [S, V] bool, gathered for this step (repetition rows)
    counts: torch.Tensor | None = None  # [S, V] float32, gathered for this step (frequency rows)

    @property
    def size(self) -> int:
        return self.slots.shape[0]


@dataclass(slots=True)
class SamplerOutput:
    token_ids: torch.Tensor  # [S] int64, on the device
    logprob: torch.Tensor | None = None  # [S] float32: raw logprob of the sampled token
    top_ids: torch.Tensor | None = None  # [S, max_logprobs] int64
    top_values: torch.Tensor | None = None  # [S, max_logprobs] float32


class SamplingTable:
    """Per-slot sampling parameters and penalty state on the device; see the module docstring.

    The host mirror (numpy arrays indexed by slot) holds what per-step decisions need without reading the
    device: which rows are greedy, use top_k / top_p / min_p / penalties / logprobs, and the sparse settings.
    """

    def __init__(
        self, num_slots: int, vocab_size: int, device: torch.device, eos_token_ids: Iterable[int] = ()
    ) -> None:
        self.num_slots, self.vocab_size, self.device = num_slots, vocab_size, device
        self.eos = frozenset(eos_token_ids)
        self.params = torch.zeros((num_slots, _NUM_FLOAT), dtype=torch.float32, device=device)
        self.top_k = torch.zeros(num_slots, dtype=torch.int64, device=device)
        self.greedy = torch.ones(num_slots, dtype=torch.bool, device=device)
        self.keys = torch.zeros(num_slots, dtype=torch.int64, device=device)
        self.seen: torch.Tensor | None = None  # [slots, V] bool, allocated when a sequence needs it
        self.counts: torch.Tensor | None = None  # [slots, V] int32
        flags = lambda: np.zeros(num_slots, dtype=bool)
        self._greedy, self._top_p, self._min_p, self._repetition, self._frequency = (
            flags() for _ in range(5)
        )
        self._top_k = np.zeros(num_slots, dtype=np.int64)  # 0: off (also for greedy rows)
        self._logprobs = np.full(num_slots, -1, dtype=np.int64)  # -1: off
        self._min_tokens = np.zeros(num_slots, dtype=np.int64)
        self._bias: list[tuple[np.ndarray, np.ndarray] | None] = [None] * num_slots  # (ids, values)
        self._stops: list[np.ndarray] = [np.zeros(0, dtype=np.int64)] * num_slots  # masked under min_tokens
        self._admitted: list[tuple[NewSequence, np.ndarray, int]] = []  # queued for the next step
        self._rng = torch.Generator().manual_seed(torch.initial_seed() % 2**63)  # unseeded rows' keys

    def ensure_penalty_buffers(self) -> None:
        """Allocate `seen` and `counts` (also called at start-up on CUDA so memory profiling counts them)."""
        if self.seen is None:
            shape = (self.num_slots, self.vocab_size)
            self.seen = torch.zeros(shape, dtype=torch.bool, device=self.device)
            self.counts = torch.zeros(shape, dtype=torch.int32, device=self.device)

    # --------------------------------------------------------------------------------------------- host
    def admit(self, new: NewSequence) -> None:
        """Remember the settings of the sequence now in `new.slot`; its device rows go with the next step."""
        p, v, slot = new.sampling, self.vocab_size, new.slot
        greedy = p.greedy
        self._greedy[slot] = greedy
        self._top_k[slot] = 0 if greedy or p.top_k <= 0 else min(p.top_k, v)
        self._top_p[slot] = not greedy and p.top_p < 1.0
        self._min_p[slot] = not greedy and p.min_p > 0.0
        self._repetition[slot] = p.repetition_penalty != 1.0
        self._frequency[slot] = p.frequency_penalty != 0.0 or p.presence_penalty != 0.0
        self._logprobs[slot] = -1 if p.logprobs is None else p.logprobs
        self._min_tokens[slot] = p.min_tokens
        bias = [(t, b) for t, b in p.logit_bias.items() if 0 <= t < v]  # out-of-range ids would crash kernels
        self._bias[slot] = (
            (
                np.asarray([t for t, _ in bias], dtype=np.int64),
                np.asarray([b for _, b in bias], dtype=np.float32),
            )
            if bias
            else None
        )
        stops = set(p.stop_token_ids) if p.ignore_eos else self.eos.union(p.stop_token_ids)
        self._stops[slot] = np.asarray(sorted(t for t in stops if 0 <= t < v), dtype=np.int64)
        row = np.zeros(_NUM_FLOAT, dtype=np.float32)
        row[[_TEMPERATURE, _TOP_P, _MIN_P]] = (1.0 if greedy else p.temperature, p.top_p, p.min_p)
        row[[_REPETITION, _FREQUENCY, _PRESENCE]] = (
            p.repetition_penalty,
            p.frequency_penalty,
            p.presence_penalty,
        )
        self._admitted.append((new, row, self._key(new)))

    def discard_admissions(self) -> None:
        """Forget admissions not yet staged (their step failed; the scheduler admits those sequences again)."""
        self._admitted.clear()

    def _key(self, new: NewSequence) -> int:
        if new.sampling.seed is None:
            return int(torch.randint(0, 2**62, (1,), generator=self._rng))
        digest = hashlib.blake2b(f"{new.sampling.seed}:{new.index}".encode(), digest_size=8).digest()
        return int.from_bytes(digest, "little") >> 2

    def stage(
        self, step: StagedStep, slots: np.ndarray, write_pos: np.ndarray, counters: np.ndarray
    ) -> _Pending:
        """Queue this step's sampling inputs: admissions, then the rows of `slots` (one per sampled sequence);
        all three are int64 arrays of the same length."""
        admitted, self._admitted = self._admitted, []
        pending = _Pending(self, step, admitted, len(slots))
        if admitted:
            adm = np.asarray([a.slot for a, _, _ in admitted], dtype=np.int64)
            pending.adm_slots = step.add(adm)
            pending.adm_rows = step.add(np.concatenate([r for _, r, _ in admitted]))
            keys = np.asarray([k for _, _, k in admitted], dtype=np.int64)
            pending.adm_ints = step.add(np.stack([keys, self._top_k[adm], self._greedy[adm]], axis=1).ravel())
            penal = [a for a, _, _ in admitted if self._repetition[a.slot] or self._frequency[a.slot]]
            if penal:
                self.ensure_penalty_buffers()
                pending.penal = [(a, step.add(np.asarray(a.token_ids, dtype=np.int64))) for a in penal]
        pending.slots = step.add(slots)
        pending.write_pos = step.add(write_pos)
        pending.counters = step.add(counters)
        logprobs = self._logprobs[slots]
        if (logprobs >= 0).any():
            pending.logprobs = [None if k < 0 else k for k in logprobs.tolist()]
        else:
            pending.logprobs = [None] * len(slots)
        greedy = self._greedy[slots]
        if not greedy.all():
            top_k = self._top_k[slots]
            topk = np.flatnonzero(~greedy & (top_k > 0))
            full = np.flatnonzero(~greedy & (top_k == 0))
            pending.max_top_k = int(top_k.max())
            pending.topk_rows = step.add(topk) if topk.size else None
            pending.full_rows = step.add(full) if full.size else None
            pending.use_top_p = bool(self._top_p[slots].any())
            pending.use_min_p = bool(self._min_p[slots].any())
        pending.use_repetition = bool(self._repetition[slots].any())
        pending.use_frequency = bool(self._frequency[slots].any())
        self._stage_sparse(step, pending, slots, counters)
        return pending

    def _stage_sparse(
        self, step: StagedStep, pending: _Pending, slots: np.ndarray, counters: np.ndarray
    ) -> None:
        """logit_bias of the rows that have one; the stop ids of rows still under min_tokens."""
        bias = [(i, self._bias[s]) for i, s in enumerate(slots.tolist()) if self._bias[s] is not None]
        if bias:
            rows = np.concatenate([np.full(ids.size, i, dtype=np.int64) for i, (ids, _) in bias])
            ids = np.concatenate([ids for _, (ids, _) in bias])
            values = np.concatenate([values for _, (_, values) in bias])
            pending.bias = (step.add(rows), step.add(ids), step.add(values))
        under = np.flatnonzero(counters < self._min_tokens[slots])
        bans = [(i, self._stops[slots[i]]) for i in under.tolist() if self._stops[slots[i]].size]
        if bans:
            rows = np.concatenate([np.full(ids.size, i, dtype=np.int64) for i, ids in bans])
            pending.banned = (step.add(rows), step.add(np.concatenate([ids for _, ids in bans])))

    # ------------------------------------------------------------------------------------------- device
    def record(self, rows: SamplingRows, tokens: torch.Tensor) -> None:
        """Count the tokens just sampled (only when a penalty needs counts; other slots' rows are reset at use)."""
        if self.seen is None or self.counts is None:
            return
        self.seen[rows.slots, tokens] = True
        self.counts.index_put_(
            (rows.slots, tokens), torch.ones_like(tokens, dtype=torch.int32), accumulate=True
        )


class _Pending:
    """Host-staged sampling inputs of one step, turned into `SamplingRows` once the staging is uploaded."""

    def __init__(self, table: SamplingTable, step: StagedStep, admitted: list, size: int) -> None:
        self.table, self.step, self.admitted, self.size = table, step, admitted, size
        self.adm_slots = self.adm_rows = self.adm_ints = -1
        self.penal: list[tuple[NewSequence, int]] = []
        self.slots = self.write_pos = self.counters = -1
        self.logprobs: list[int | None] = []
        self.max_top_k = 0
        self.topk_rows: int | None = None
        self.full_rows: int | None = None
        self.use_top_p = self.use_min_p = self.use_repetition = self.use_frequency = False
        self.bias: tuple[int, int, int] | None = None
        self.banned: tuple[int, int] | None = None

    def finish(self) -> SamplingRows:
        t, get = self.table, self.step.get
        if self.admitted:
            slots = get(self.adm_slots)
            t.params[slots] = get(self.adm_rows).view(-1, _NUM_FLOAT)
            ints = get(self.adm_ints).view(-1, 3)  # key, top_k, greedy
            t.keys[slots] = ints[:, 0]
            t.top_k[slots] = ints[:, 1]
            t.greedy[slots] = ints[:, 2].bool()
            for new, handle in self.penal:
                seen, counts = t.seen, t.counts
                assert seen is not None and counts is not None, "stage() allocates them for penalties"
                tokens = get(handle)
                seen[new.slot] = False
                seen[new.slot, tokens] = True
                counts[new.slot] = 0
                outputs = tokens[new.num_prompt_tokens :]
                counts[new.slot].index_add_(0, outputs, torch.ones_like(outputs, dtype=torch.int32))
        slots = get(self.slots)
        optional = lambda h: None if h is None else get(h)
        rows = SamplingRows(
            slots=slots,
            write_pos=get(self.write_pos),
            keys=t.keys[slots],
            counters=get(self.counters),
            params=t.params[slots],
            top_k=t.top_k[slots],
            greedy=t.greedy[slots],
            all_greedy=self.topk_rows is None and self.full_rows is None,
            topk_rows=optional(self.topk_rows),
            full_rows=optional(self.full_rows),
            max_top_k=self.max_top_k,
            use_top_p=self.use_top_p,
            use_min_p=self.use_min_p,
            use_repetition=self.use_repetition,
            use_frequency=self.use_frequency,
            bias=None if self.bias is None else (get(self.bias[0]), get(self.bias[1]), get(self.bias[2])),
            banned=None if self.banned is None else (get(self.banned[0]), get(self.banned[1])),
            logprobs=self.logprobs,
            max_logprobs=max((k for k in self.logprobs if k is not None), default=-1),
        )
        if self.use_repetition:
            assert t.seen is not None
            rows.seen = t.seen[slots]
        if self.use_frequency:
            assert t.counts is not None
            rows.counts = t.counts[slots].float()
        return rows


class Sampler:
    """Stateless; see the module docstring for the pipeline."""

    def __call__(self, logits: torch.Tensor, rows: SamplingRows, consume: bool = False) -> SamplerOutput:
        # logits: [S, V] float32. The caller's tensor is not modified unless it hands it over with `consume=True`
        # (the model runner does: it saves a [S, V] copy per step, 32 MB at S = 64).
        assert logits.shape[0] == rows.size, "one row of logits per sampled sequence"
        logits = logits.float()
        raw = torch.log_softmax(logits, dim=-1) if rows.max_logprobs >= 0 else None
        logits = _apply_bias_and_bans(logits, rows, inplace=consume)
        logits = _apply_penalties(logits, rows)
        tokens = logits.argmax(dim=-1)
        if not rows.all_greedy:
            tokens = torch.where(rows.greedy, tokens, _sample(logits, rows))
        out = SamplerOutput(tokens)
        if raw is not None:
            out.logprob = raw.gather(1, tokens[:, None]).squeeze(1)
            if rows.max_logprobs > 0:
                top = raw.topk(rows.max_logprobs, dim=-1)
                out.top_ids, out.top_values = top.indices, top.values
        return out


def _apply_bias_and_bans(logits: torch.Tensor, rows: SamplingRows, inplace: bool) -> torch.Tensor:
    if rows.bias is None and rows.banned is None:
        return logits
    if not inplace:
        logits = logits.clone()
    if rows.bias is not None:
        r, ids, values = rows.bias
        logits.index_put_((r, ids), values, accumulate=True)
    if rows.banned is not None:
        logits[rows.banned] = float("-inf")
    return logits


def _apply_penalties(logits: torch.Tensor, rows: SamplingRows) -> torch.Tensor:
    if rows.seen is not None:
        penalty = rows.params[:, _REPETITION, None]
        scaled = torch.where(logits > 0, logits / penalty, logits * penalty)
        logits = torch.where(rows.seen, scaled, logits)
    if rows.counts is not None:
        counts = rows.counts
        frequency, presence = rows.params[:, _FREQUENCY, None], rows.params[:, _PRESENCE, None]
        logits = logits - frequency * counts - presence * (counts > 0)
    return logits


def _sample(logits: torch.Tensor, rows: SamplingRows) -> torch.Tensor:
    """Tokens [S] for the non-greedy rows (greedy rows get an arbitrary value, replaced by the caller)."""
    tokens = torch.zeros(rows.size, dtype=torch.int64, device=logits.device)
    uniform = counter_uniform(rows.keys, rows.counters)  # [S] float64 in [0, 1)
    if rows.topk_rows is not None:
        r = rows.topk_rows
        tokens[r] = _sample_top_k(logits[r], rows.params[r], rows.top_k[r], uniform[r], rows)
    if rows.full_rows is not None:
        r = rows.full_rows
        tokens[r] = _sample_full(logits[r], rows.params[r], uniform[r], rows)
    return tokens


def _min_p_keep(scaled: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """p_i >= min_p * p_max, written on logits: (l_i - l_max) >= log(min_p) (min_p = 0 keeps everything)."""
    top = scaled.amax(dim=-1, keepdim=True)
    return (scaled - top) >= torch.log(min_p)[:, None]


def _sample_top_k(
    logits: torch.Tensor, params: torch.Tensor, top_k: torch.Tensor, uniform: torch.Tensor, rows: SamplingRows
) -> torch.Tensor:
    """Rows with top_k: min_p, top_k and top_p on the `max_top_k` best candidates (sorted by torch.topk)."""
    scaled = logits / params[:, _TEMPERATURE, None]
    values, ids = scaled.topk(rows.max_top_k, dim=-1)  # [R, K], descending
    neg_inf = float("-inf")
    ranks = torch.arange(values.shape[1], device=values.device)
    drop = ranks[None, :] >= top_k[:, None]
    if rows.use_min_p:
        drop |= ~_min_p_keep(values, params[:, _MIN_P])
    if rows.use_top_p:
        probs = torch.softmax(values.masked_fill(drop, neg_inf), dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs  # keep the smallest prefix reaching top_p
        # Rows without top_p compare with 2.0, not 1.0: float rounding of the sum must not trim their tail.
        top_p = params[:, _TOP_P]
        drop |= mass_before >= top_p.masked_fill(top_p >= 1.0, 2.0)[:, None]
    probs = torch.softmax(values.masked_fill(drop, neg_inf), dim=-1)
    return ids.gather(1, _inverse_cdf(probs, uniform)[:, None]).squeeze(1)


def _sample_full(
    logits: torch.Tensor, params: torch.Tensor, uniform: torch.Tensor, rows: SamplingRows
) -> torch.Tensor:
    """Rows without top_k: min_p and a sort-free top_p over the whole vocabulary."""
    scaled = logits / params[:, _TEMPERATURE, None]
    if rows.use_min_p:
        scaled = scaled.masked_fill(~_min_p_keep(scaled, params[:, _MIN_P]), float("-inf"))
    probs = torch.softmax(scaled, dim=-1)
    if rows.use_top_p:
        top_p = params[:, _TOP_P]
        keep = (probs >= _nucleus_threshold(probs, top_p)) | (top_p >= 1.0)[:, None]
        probs = probs * keep
    return _inverse_cdf(probs, uniform)


def _nucleus_threshold(probs: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """[R, 1]: the largest probability value t with sum(p >= t) >= top_p (bisection on float32 bit patterns).

    Keeping p >= t is the smallest sorted prefix reaching top_p, plus any tokens tied with its last one. The
    sum is compared with top_p * (1 - 1e-6) * total, so that summation order (unsorted here, sorted in the
    usual implementation) cannot add a token to a prefix that reaches top_p up to rounding.
    """
    bits = probs.view(torch.int32)  # non-negative floats order like their bit patterns
    lo = torch.zeros(probs.shape[0], 1, dtype=torch.int32, device=probs.device)  # sum(p >= 0) = 1 >= top_p
    hi = bits.amax(dim=-1, keepdim=True) + 1  # sum(p >= hi) = 0 < top_p
    target = top_p[:, None] * probs.sum(dim=-1, keepdim=True) * (1 - 1e-6)
    for _ in range(_TOP_P_BISECTIONS):
        mid = lo + (hi - lo) // 2
        ok = torch.where(bits >= mid, probs, 0.0).sum(dim=-1, keepdim=True) >= target
        lo = torch.where(ok, mid, lo)
        hi = torch.where(ok, hi, mid)
    return lo.view(torch.float32)


def _inverse_cdf(probs: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """One draw per row of an unnormalised distribution [R, N] from uniforms [R] in [0, 1): indices [R]."""
    cdf = probs.double().cumsum(dim=-1)
    target = uniform * cdf[:, -1]
    index = torch.searchsorted(cdf, target[:, None], right=True).squeeze(1)
    return index.clamp_max(probs.shape[1] - 1)


# --------------------------------------------------------------------------------------- counter-based RNG
_M32 = 0xFFFFFFFF


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2^32 for x in [0, 2^32) in int64 without overflow (c split into 16-bit halves)."""
    return ((x * (c & 0xFFFF)) + (((x * (c >> 16)) & 0xFFFF) << 16)) & _M32


def _fmix32(x: torch.Tensor) -> torch.Tensor:
    """murmur3's 32-bit finalizer: a bijection with full avalanche."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x85EBCA6B)
    x = x ^ (x >> 13)
    x = _mul32(x, 0xC2B2AE35)
    return x ^ (x >> 16)


def counter_uniform(keys: torch.Tensor, counters: torch.Tensor) -> torch.Tensor:
    """A uniform float64 in [0, 1) per (key, counter) pair, [N] int64 each: the same pair, the same value."""
    k_lo, k_hi = keys & _M32, (keys >> 32) & _M32
    c = counters & _M32
    a = _fmix32(k_lo ^ _fmix32(c ^ 0x9E3779B9))
    b = _fmix32(k_hi ^ _fmix32(a ^ 0x7F4A7C15))
    a = _fmix32(a ^ _fmix32(b ^ c ^ 0x85EBCA77))
    bits53 = ((a & 0x1FFFFF) << 32) | b  # 21 + 32 bits
    return bits53.double() / float(2**53)


def logprobs_to_host(
    logprobs: list[int | None], logprob: list[float] | None, top_ids: list | None, top_values: list | None
) -> list[RowLogprobs | None]:
    """Per-row (sampled logprob, [(id, logprob)] best first) from the copied tensors; None where not asked."""
    out: list[RowLogprobs | None] = []
    for row, k in enumerate(logprobs):
        if k is None or logprob is None:
            out.append(None)
            continue
        top = (
            []
            if k == 0 or top_ids is None or top_values is None
            else list(zip(top_ids[row][:k], top_values[row][:k], strict=True))
        )
        out.append((logprob[row], top))
    return out
