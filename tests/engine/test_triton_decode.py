"""The Triton paged-decode kernel against the torch reference (fp32; in Triton's interpreter without a GPU).

Every case is one batch holding contexts 1, 15, 16, 17 and 333 (around the 16-token block and the 64-token tile
edges, and a long one that spans several tiles and splits) over scattered blocks, plus graph padding rows
(context 0) that must come out zero.
"""

from __future__ import annotations

import pytest
import torch

from plm_serve.engine.attention import TorchPagedAttention
from plm_serve.engine.attention.paged_decode import (
    MAX_SPLITS,
    DecodeWorkspace,
    choose_num_splits,
    paged_decode,
)
from tests.engine.paged_steps import paged_step

CONTEXTS = [1, 15, 16, 17, 333]


def _decode_step(num_heads: int, num_kv_heads: int, head_dim: int, dtype=torch.float32, pad_rows: int = 2):
    return paged_step(
        [(c - 1, 1) for c in CONTEXTS], num_heads, num_kv_heads, head_dim, pad_rows, dtype=dtype
    )


def _run(step, num_splits: int, **kw) -> torch.Tensor:
    keys, values = step.cache.data[0, 0], step.cache.data[0, 1]
    meta = step.meta
    return paged_decode(
        step.q, keys, values, meta.block_tables, meta.context_lens, num_splits=num_splits, **kw
    )


@pytest.mark.parametrize(
    ("num_heads", "num_kv_heads", "head_dim"),
    [(8, 2, 64), (6, 2, 128)],  # GQA ratio 4 (PLM-1B/8B) and 3 (PLM-3B); head dims of 1B and 3B/8B
)
@pytest.mark.parametrize("num_splits", [1, 3, 8])
def test_decode_matches_reference(num_heads: int, num_kv_heads: int, head_dim: int, num_splits: int) -> None:
    step = _decode_step(num_heads, num_kv_heads, head_dim)
    out = _run(step, num_splits)
    real = len(CONTEXTS)
    torch.testing.assert_close(out, step.expected(), atol=2e-6, rtol=1e-5)
    assert torch.equal(out[real:], torch.zeros_like(out[real:]))  # padding rows: exactly zero
    # The engine's torch oracle on the real rows (it cannot take context-0 rows).
    ref_step = paged_step([(c - 1, 1) for c in CONTEXTS], num_heads, num_kv_heads, head_dim)
    want = TorchPagedAttention(ref_step.cache, ref_step.meta)(0, ref_step.q, ref_step.k, ref_step.v)
    torch.testing.assert_close(_run(ref_step, num_splits), want, atol=2e-6, rtol=1e-5)


def test_decode_bf16_upcast_in_interpreter_and_reusable_workspace() -> None:
    step = _decode_step(8, 2, 64, dtype=torch.bfloat16)
    b, hq, d = step.q.shape
    workspace = DecodeWorkspace.allocate(b, hq, 4, d, step.q.device)
    out = _run(step, 4, workspace=workspace)
    again = _run(step, 4, workspace=workspace)
    assert out.dtype == torch.bfloat16 and torch.equal(out, again)
    torch.testing.assert_close(out.float(), step.expected(), atol=2e-2, rtol=2e-2)  # bf16 output rounding


def test_decode_tile_and_block_size_variants() -> None:
    """A page of 8 tokens (tiles span pages) and a 16-token tile (several tiles per split)."""
    step = paged_step([(c - 1, 1) for c in CONTEXTS], 8, 2, 64, block_size=8)
    out = _run(step, 2, block_n=16)
    torch.testing.assert_close(out, step.expected(), atol=2e-6, rtol=1e-5)


def test_split_count_depends_on_batch_only() -> None:
    assert choose_num_splits(1, 8, 132) == MAX_SPLITS
    assert choose_num_splits(8, 8, 132) == 8  # 264 / 64 -> 5 -> the next power of two
    assert choose_num_splits(32, 8, 132) == 2
    assert choose_num_splits(33, 8, 132) == 1 and choose_num_splits(256, 8, 132) == 1
    with pytest.raises(ValueError, match="num_splits"):
        _run(_decode_step(8, 2, 64, pad_rows=0), MAX_SPLITS + 1)
