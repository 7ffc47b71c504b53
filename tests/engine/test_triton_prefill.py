"""The Triton paged-prefill (unified) kernel against `causal_sdpa` over each sequence's whole K/V (fp32).

Chunks over cached prefixes of several lengths (none, shorter than a block, on and around block edges, many
blocks), mixed with decode rows in the same launch, for GQA ratios 4 and 3 and head dims 64 and 128.
"""

from __future__ import annotations

import pytest
import torch

from plm_serve.engine.attention.paged_prefill import paged_prefill
from tests.engine.paged_steps import paged_step

# (tokens already cached, tokens in this step)
MIXED = [(0, 33), (1, 5), (36, 1), (15, 17), (16, 2), (100, 40), (2, 1)]


def _run(step, **kw) -> torch.Tensor:
    m = step.meta
    keys, values = step.cache.data[0, 0], step.cache.data[0, 1]
    return paged_prefill(
        step.q,
        keys,
        values,
        m.block_tables,
        m.context_lens,
        m.query_start,
        max_query_len=m.max_query_len,
        **kw,
    )


@pytest.mark.parametrize(("num_heads", "num_kv_heads", "head_dim"), [(8, 2, 64), (6, 2, 128)])
@pytest.mark.parametrize("block_m", [16, 64])
def test_mixed_step_matches_causal_sdpa(
    num_heads: int, num_kv_heads: int, head_dim: int, block_m: int
) -> None:
    step = paged_step(MIXED, num_heads, num_kv_heads, head_dim)
    torch.testing.assert_close(_run(step, block_m=block_m), step.expected(), atol=2e-6, rtol=1e-5)


def test_decode_rows_and_graph_padding_through_the_unified_kernel() -> None:
    """Decode-only rows (query_len 1) with context-0 padding rows: padding comes out zero, no NaN."""
    step = paged_step([(4, 1), (40, 1), (0, 1)], 8, 2, 64, pad_rows=3)
    out = _run(step)
    torch.testing.assert_close(out, step.expected(), atol=2e-6, rtol=1e-5)
    assert torch.equal(out[3:], torch.zeros_like(out[3:]))


def test_long_chunk_over_a_long_prefix_with_small_pages() -> None:
    """Several query blocks per sequence and tiles spanning many 8-token pages."""
    step = paged_step([(150, 70), (0, 9)], 8, 2, 64, block_size=8)
    torch.testing.assert_close(_run(step, block_n=32), step.expected(), atol=2e-6, rtol=1e-5)


def test_bf16_upcast_in_interpreter() -> None:
    step = paged_step(MIXED[:4], 8, 2, 64, dtype=torch.bfloat16)
    out = _run(step)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), step.expected(), atol=2e-2, rtol=2e-2)


def test_block_m_must_hold_the_group() -> None:
    step = paged_step([(0, 3)], 8, 2, 64)
    with pytest.raises(ValueError, match="block_m"):
        _run(step, block_m=24)
