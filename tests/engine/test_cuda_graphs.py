"""Decode graphs on the CPU, through a stand-in graph that records the callable at capture and calls it again at
replay: the bucketing, the static buffers, padding rows that write no KV, and tokens identical to eager steps.
(What only a GPU can show, capture and replay of real CUDA graphs, is in bench/gpu_check.py.)"""

from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer

from plm_serve.engine import EngineConfig, EngineCore
from plm_serve.engine.cuda_graphs import DecodeGraphs, graph_buckets
from plm_serve.engine.model_runner import ModelRunner
from plm_serve.models import load_model
from tests import reference
from tests.engine import engine_fixtures as fx


class RecordingGraph:
    """Capture runs `fn` once and keeps its output as the static output; replay recomputes into it."""

    def __init__(self) -> None:
        self.replays = 0

    def capture(self, fn, pool) -> torch.Tensor:
        self.fn = fn
        self.out = fn()
        return self.out

    def replay(self) -> None:
        self.replays += 1
        self.out.copy_(self.fn())


def make_core(ckpt, graphs: bool, **overrides) -> EngineCore:
    args = dict(
        model=str(ckpt), device="cpu", dtype="float32", num_kv_blocks=256, max_num_batched_tokens=2048,
        max_num_seqs=12, enable_cuda_graphs=graphs,
    )  # fmt: skip
    config = EngineConfig(**{**args, **overrides})
    model = load_model(ckpt, device="cpu", dtype=torch.float32)
    runner = ModelRunner(model, config, torch.device("cpu"), torch.float32, graph_factory=RecordingGraph)
    return EngineCore(config, runner, Tokenizer.from_file(str(ckpt / "tokenizer.json")), model.config)


def run(core: EngineCore, reqs) -> dict[str, list[int]]:
    tokens = {r.request_id: [] for r in reqs}
    for r in reqs:
        core.add_request(r)
    while core.has_unfinished():
        for out in core.step():
            assert out.error is None, out.error
            tokens[out.request_id].extend(out.token_ids)
    core.scheduler.check_integrity()
    return tokens


def test_buckets() -> None:
    assert graph_buckets(1) == [1]
    assert graph_buckets(12) == [1, 2, 4, 8, 12]
    assert graph_buckets(256) == [1, 2, 4, 8, *range(16, 257, 16)]
    assert graph_buckets(2048)[-1] == 512  # capture time and pool memory stay bounded
    graphs = DecodeGraphs(None, None, graph_buckets(40), RecordingGraph, lambda: None)
    graphs._graphs = dict.fromkeys(graphs.buckets)  # as if captured
    assert [graphs.bucket_for(b) for b in (1, 3, 8, 9, 17, 40, 41)] == [1, 4, 8, 16, 32, 40, None]


@pytest.fixture(scope="module")
def prompts(ckpt_l):
    return fx.standard_prompts(reference.load_hf_processor(ckpt_l))


def test_graph_steps_give_the_eager_tokens_and_write_no_kv_from_padding(ckpt_l, prompts):
    # 7 requests prefilled in one step, then decode batches of 7, 6, ... padded up to buckets 8 and 4.
    lengths = [3, 5, 6, 8, 9, 10, 12]
    chosen = [prompts[i] for i in (0, 4, 4, 0, 4, 0, 4)]  # text and system prompts (graphs never see media)
    reqs = lambda: [
        fx.request(p, f"r{i}", max_tokens=n, min_tokens=n)
        for i, (p, n) in enumerate(zip(chosen, lengths, strict=True))
    ]
    eager = run(make_core(ckpt_l, graphs=False, max_prefill_tokens_per_decode_step=None), reqs())

    core = make_core(ckpt_l, graphs=True, max_prefill_tokens_per_decode_step=None)
    graphs = core.runner.graphs
    assert graphs is not None and graphs.buckets == [1, 2, 4, 8, 12]
    static = graphs.static
    pointers = [t.data_ptr() for t in (static.input_ids, static.slot_mapping, static.block_tables)]
    outputs = {bs: out for bs, (_, out) in graphs._graphs.items()}
    kv = core.runner.kv_cache
    num_real = kv.num_blocks - 1  # the last block is the scratch block padding rows may write
    used: list[tuple[int, int]] = []
    original_run = graphs.run

    def checked_run(batch, full_tables, bs):
        before = kv.data[:, :, :num_real].clone()
        hidden = original_run(batch, full_tables, bs)
        b = batch.num_rows
        used.append((b, bs))
        changed = (kv.data[:, :, :num_real] != before).flatten(4).any(-1).any(0).any(0).flatten()  # per slot
        allowed = torch.zeros_like(changed)
        allowed[batch.metadata.slot_mapping] = True
        assert not (changed & ~allowed).any(), "a padding row wrote into the KV pool"
        assert static.slot_mapping[b:bs].eq(-1).all() and static.context_lens[b:bs].eq(0).all()
        assert hidden.data_ptr() == outputs[bs].data_ptr()  # the bucket's own static output
        return hidden

    graphs.run = checked_run
    assert run(core, reqs()) == eager
    assert {bs for _, bs in used} >= {8, 4} and any(b < bs for b, bs in used)
    assert sum(g.replays for g, _ in graphs._graphs.values()) == len(used) > 0
    assert [t.data_ptr() for t in (static.input_ids, static.slot_mapping, static.block_tables)] == pointers


def test_batches_beyond_the_largest_bucket_and_mixed_steps_run_eagerly(ckpt_l, prompts):
    core = make_core(ckpt_l, graphs=True, max_num_seqs=3)
    replays = lambda: sum(g.replays for g, _ in core.runner.graphs._graphs.values())
    reqs = [fx.request(prompts[0], f"r{i}", max_tokens=4, min_tokens=4) for i in range(3)]
    for r in reqs:
        core.add_request(r)
    core.step()  # three prefills: eager
    assert replays() == 0
    core.runner.graphs.buckets = [1, 2]  # now 3 decodes exceed the largest bucket
    core.step()
    assert replays() == 0


def test_the_cuda_configuration_gives_the_reference_tokens(ckpt_l, prompts):
    """What CUDA runs by default, on the CPU: the Triton attention backend (in the interpreter) captured in the
    stand-in decode graphs, with the overlapped loop. The tokens equal the torch backend's, eager and
    synchronous. (Text only: the interpreter is slow, and media prefill through Triton is in
    test_triton_backend.py.)"""
    text, _, _, _, system = prompts
    reqs = lambda: [
        fx.request(text, "text", max_tokens=4, min_tokens=4),
        fx.request(system, "seeded", max_tokens=3, min_tokens=3, temperature=1.0, top_k=20, seed=5),
    ]
    small = dict(max_num_seqs=2, max_prefill_tokens_per_decode_step=None)
    reference_tokens = run(
        make_core(ckpt_l, graphs=False, attention_backend="torch", overlap_scheduling=False, **small), reqs()
    )
    core = make_core(ckpt_l, graphs=True, attention_backend="triton", overlap_scheduling=True, **small)
    assert core.runner.attention_backend == "triton" and core.overlap
    graphs = core.runner.graphs
    assert graphs is not None
    assert run(core, reqs()) == reference_tokens
    assert sum(g.replays for g, _ in graphs._graphs.values()) > 0
