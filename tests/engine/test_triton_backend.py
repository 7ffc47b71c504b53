"""`TritonPagedAttention` against `TorchPagedAttention` (the oracle), and the backend choice.

Layer level: the same mixed step through both backends (what they store and what they return), the fused
RoPE entry point, a decode-only step with CUDA-graph padding rows. Model level: the tiny PE-L checkpoint
generating greedily for two sequences through each backend, prefill then decode steps (fp32).
"""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch

from plm_serve.engine.attention import (
    AttentionMetadata,
    KVCache,
    TorchPagedAttention,
    make_attention,
    resolve_backend,
)
from plm_serve.models import fused_ops, load_model
from plm_serve.models.rope import apply_rotate_half
from tests.engine.paged_steps import DEVICE, paged_step

MIXED = [(36, 1), (20, 5), (2, 1), (0, 6), (17, 16)]


def test_mixed_step_stores_and_attends_like_the_reference() -> None:
    ref = paged_step(MIXED, 8, 2, 64, store_step=False)
    ours = paged_step(MIXED, 8, 2, 64, store_step=False)
    want = TorchPagedAttention(ref.cache, ref.meta)(0, ref.q, ref.k, ref.v)
    got = make_attention(ours.cache, ours.meta, backend="triton")(0, ours.q, ours.k, ours.v)
    torch.testing.assert_close(got, want, atol=2e-6, rtol=1e-5)
    assert torch.equal(ours.cache.data, ref.cache.data)


def test_rotary_entry_point_equals_rope_then_attend() -> None:
    ref = paged_step(MIXED, 6, 2, 128, store_step=False)
    ours = paged_step(MIXED, 6, 2, 128, store_step=False)
    t = ref.q.shape[0]
    angles = torch.rand(t, 1, 64, generator=torch.Generator().manual_seed(3)).to(DEVICE) * 50
    cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()
    want = TorchPagedAttention(ref.cache, ref.meta)(
        0, apply_rotate_half(ref.q, cos, sin), apply_rotate_half(ref.k, cos, sin), ref.v
    )
    backend = make_attention(ours.cache, ours.meta, backend="triton")
    got = backend.rotary(0, ours.q, ours.k, ours.v, cos, sin)
    torch.testing.assert_close(got, want, atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(ours.cache.data, ref.cache.data, atol=0, rtol=0)


def test_decode_step_with_graph_padding_rows() -> None:
    step = paged_step([(c - 1, 1) for c in (1, 16, 17, 90)], 8, 2, 64, pad_rows=3, store_step=False)
    before = step.cache.data.clone()
    backend = make_attention(step.cache, step.meta, backend="triton", num_splits=4)
    assert backend.decode_only and backend.num_splits == 4
    out = backend(0, step.q, step.k, step.v)
    torch.testing.assert_close(out, step.expected(), atol=2e-6, rtol=1e-5)
    assert torch.equal(out[4:], torch.zeros_like(out[4:]))
    changed = (step.cache.data != before).any(-1).any(-1)  # [1, 2, blocks, block_size]: slots written
    real_slots = step.meta.slot_mapping[:4]
    assert int(changed.sum()) == 2 * len(real_slots)  # keys and values of the 4 real rows, nothing else


def test_backend_choice() -> None:
    cpu_pool = KVCache.allocate(1, 2, 16, 2, 64, torch.float32, "cpu")
    assert resolve_backend("auto", cpu_pool) == "torch"  # the CPU path is the torch reference
    assert resolve_backend("torch", cpu_pool) == "torch"
    with pytest.raises(ValueError, match="unknown attention backend"):
        resolve_backend("flash", cpu_pool)
    odd = KVCache.allocate(1, 2, 16, 2, 63, torch.float32, "cpu")
    with pytest.raises(ValueError, match="head_dim"):
        resolve_backend("triton", odd)


def _metadata(
    chunks: list[tuple[list[int], int, int]], block_size: int
) -> tuple[AttentionMetadata, torch.Tensor]:
    """chunks: (block table, first position, tokens) per sequence -> (metadata, positions [T])."""
    slots, positions = [], []
    for table, start, n in chunks:
        positions.extend(range(start, start + n))
        slots.extend(table[p // block_size] * block_size + p % block_size for p in range(start, start + n))
    width = max(len(t) for t, _, _ in chunks)
    lens = [n for _, _, n in chunks]
    context = [s + n for _, s, n in chunks]
    meta = AttentionMetadata(
        slot_mapping=torch.tensor(slots, device=DEVICE),
        block_tables=torch.tensor(
            [t + [0] * (width - len(t)) for t, _, _ in chunks], dtype=torch.int32, device=DEVICE
        ),
        context_lens=torch.tensor(context, device=DEVICE),
        query_lens=lens,
        context_lens_host=context,
        query_start=torch.tensor([0, *itertools.accumulate(lens)], dtype=torch.int32, device=DEVICE),
        max_query_len=max(lens),
    )
    return meta, torch.tensor(positions, device=DEVICE)


@torch.inference_mode()
def _generate(
    model, backend: str, prompts: list[list[int]], steps: int
) -> tuple[list[list[int]], torch.Tensor]:
    """Greedy: one prefill step for all prompts, then decode steps for all; returns tokens and all logits."""
    text = model.config.text
    bs = 4
    cache = KVCache.allocate(
        text.num_hidden_layers, 24, bs, text.num_key_value_heads, text.head_dim, model.dtype, DEVICE
    )
    tables = [[7, 3, 11, 0, 20, 5, 16, 9], [2, 14, 19, 1, 8, 22, 12, 6]]  # scattered blocks
    tokens = [list(p) for p in prompts]
    done = [0, 0]  # tokens of each sequence already in the cache
    all_logits = []
    for _ in range(steps):
        chunks = [(tables[i], done[i], len(tokens[i]) - done[i]) for i in range(len(tokens))]
        meta, positions = _metadata(chunks, bs)
        ids = torch.tensor([t for i, seq in enumerate(tokens) for t in seq[done[i] :]], device=DEVICE)
        hidden = model(model.embed_tokens(ids), positions, make_attention(cache, meta, backend=backend))
        last = meta.query_start[1:].long() - 1
        logits = model.compute_logits(hidden[last])
        all_logits.append(logits)
        for i, tok in enumerate(logits.argmax(-1).tolist()):
            done[i] = len(tokens[i])
            tokens[i].append(tok)
    return tokens, torch.cat(all_logits)


def test_greedy_generation_matches_the_torch_backend(ckpt_l: Path) -> None:
    """The whole CUDA path (Triton attention with fused RoPE, Triton norms and silu * mul) against torch."""
    model = load_model(ckpt_l, device=DEVICE)
    prompts = [list(range(1000, 1019)), [128000, 42, 4242, 9, 77]]
    with fused_ops.kernel_mode("torch"):
        ref_tokens, ref_logits = _generate(model, "torch", prompts, 4)
    with fused_ops.kernel_mode("triton"):
        tokens, logits = _generate(model, "triton", prompts, 4)
    assert tokens == ref_tokens
    assert (logits - ref_logits).abs().max().item() <= 1e-4
