"""Device-resident batch state: the step inputs it builds from diffs equal those built from the live sequences.

The oracle is the model runner's former `_prepare`, which rebuilt every list from the scheduler's `Sequence`
objects each step. A real scheduler produces random mixed steps (chunked prefills, decodes, images split across
chunks, prefix-cache hits, preemptions); each step's metadata, positions, input ids, sample rows and media rows
must match exactly, with decode inputs coming from the tokens the state wrote on the device.
"""

from __future__ import annotations

import itertools
import random

import pytest
import torch

from plm_serve.engine.config import EngineConfig
from plm_serve.engine.device_state import DeviceBatchState
from plm_serve.engine.request import EngineRequest, MMInput, SamplingParams
from plm_serve.engine.sampler import SamplerOutput
from plm_serve.engine.scheduler import Scheduler

BS = 4
IMG = 128002
VOCAB = 1000


def oracle(chunks, sched: Scheduler) -> dict:
    """The former ModelRunner._prepare, on the scheduler's live sequences (all tokens known: sync loop)."""
    ids, positions, slots, media_rows, media, sample_rows, tables = [], [], [], [], [], [], []
    for c in chunks:
        seq = sched.sequence(c.seq_id)
        start, end = c.start, c.start + c.num_tokens
        row0 = len(ids)
        ids.extend(seq.token_ids[start:end])
        positions.extend(range(start, end))
        table = seq.block_table
        slots.extend(table[p // BS] * BS + p % BS for p in range(start, end))
        for item in seq.mm_inputs:
            lo, hi = max(start, item.offset), min(end, item.offset + item.length)
            if lo < hi:
                media_rows.extend(range(row0 + lo - start, row0 + hi - start))
                media.append((item.content_hash, lo - item.offset, hi - lo))
        if c.sample:
            sample_rows.append(len(ids) - 1)
        tables.append(table)
    width = max(len(t) for t in tables)
    context = [c.start + c.num_tokens for c in chunks]
    return {
        "input_ids": ids,
        "positions": positions,
        "slot_mapping": slots,
        "block_tables": [t + [0] * (width - len(t)) for t in tables],
        "context_lens": context,
        "query_lens": [c.num_tokens for c in chunks],
        "context_lens_host": context,
        "query_start": [0, *itertools.accumulate(c.num_tokens for c in chunks)],
        "max_query_len": max(c.num_tokens for c in chunks),
        "sample_rows": sample_rows,
        "media_rows": media_rows,
        "media": media,
    }


def built(batch) -> dict:
    m = batch.metadata
    return {
        "input_ids": batch.input_ids.tolist(),
        "positions": batch.positions.tolist(),
        "slot_mapping": m.slot_mapping.tolist(),
        "block_tables": m.block_tables.tolist(),
        "context_lens": m.context_lens.tolist(),
        "query_lens": m.query_lens,
        "context_lens_host": m.context_lens_host,
        "query_start": m.query_start.tolist(),
        "max_query_len": m.max_query_len,
        "sample_rows": batch.sample_rows.tolist(),
        "media_rows": [] if batch.media_rows is None else batch.media_rows.tolist(),
        "media": [(s.content_hash, s.row, s.num_rows) for s in batch.media],
    }


def workload(rng: random.Random) -> list[EngineRequest]:
    reqs = []
    shared = [rng.randrange(3, VOCAB) for _ in range(12)]  # a common prefix: prefix-cache hits
    for i in range(14):
        text = [rng.randrange(3, VOCAB) for _ in range(rng.randrange(2, 40))]
        mm = []
        if i % 3 == 1:
            n = 4 * rng.randrange(1, 5)
            mm = [MMInput(f"img{i % 2}", torch.zeros(1, 3, 1, 1, dtype=torch.uint8), len(shared) + 2, n)]
            text = [7, 8, *([IMG] * n), *text]
        sampling = SamplingParams(max_tokens=rng.randrange(1, 9), n=2 if i == 5 else 1, ignore_eos=True)
        reqs.append(EngineRequest(f"r{i}", shared + text, sampling, mm))
    return reqs


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize(("seed", "num_blocks", "budget"), [(0, 200, 48), (1, 30, 24), (2, 200, 9)])
def test_metadata_equals_the_rebuilt_one_on_random_steps(device, seed, num_blocks, budget) -> None:
    rng = random.Random(seed)
    cfg = EngineConfig(
        model="x", block_size=BS, max_num_batched_tokens=budget, max_num_seqs=6, max_model_len=256
    )
    sched = Scheduler(cfg, num_blocks=num_blocks, eos_token_ids=set())
    state = DeviceBatchState(cfg.max_num_seqs, 256, BS, VOCAB, torch.device(device))
    pending = workload(rng)
    kinds = set()
    for step in itertools.count():
        for req in pending[:2] if step % 2 == 0 else []:
            sched.add_request(req)
        pending = pending[2:] if step % 2 == 0 else pending
        out = sched.schedule()
        if out.is_empty:
            if not (pending or sched.has_unfinished()):
                break
            continue
        kinds.add(
            "decode-only"
            if out.is_decode_only
            else "mixed"
            if any(c.is_decode for c in out.chunks)
            else "prefill"
        )
        kinds.update("media" for c in out.chunks if c.media)
        kinds.update("preempted" for _ in out.preempted)
        want = oracle(out.chunks, sched)
        batch = state.prepare(out)
        assert built(batch) == want, f"step {step}"
        assert batch.is_decode_only == out.is_decode_only
        sampled = {}
        if batch.sampling is not None:
            tokens = torch.tensor([rng.randrange(3, VOCAB) for _ in batch.sample_seq_ids], device=device)
            state.record_sampled(batch, SamplerOutput(tokens))
            sampled = dict(zip(batch.sample_seq_ids, tokens.tolist(), strict=True))
        sched.update(out, sampled)
        sched.check_integrity()
        assert step < 2000
    assert kinds >= {"decode-only", "mixed", "prefill", "media"}
    if num_blocks == 30:
        assert "preempted" in kinds
