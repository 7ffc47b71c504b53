"""BlockManager: exact block ids, free-queue eviction order, ref counts, prefix hits and media keys."""

from __future__ import annotations

import pytest
import torch

from plm_serve.engine.block_manager import BlockManager
from plm_serve.engine.request import MMInput, SamplingParams
from plm_serve.engine.sequence import Sequence

BS = 4  # small blocks keep the expectations readable
IMG = 128002


def make_seq(tokens: list[int], mm: list[MMInput] | None = None, seq_id: int = 0) -> Sequence:
    return Sequence(
        seq_id=seq_id,
        request_id=f"r{seq_id}",
        index=0,
        token_ids=list(tokens),
        num_prompt_tokens=len(tokens),
        sampling=SamplingParams(),
        mm_inputs=mm or [],
    )


def image(content_hash: str, offset: int, length: int) -> MMInput:
    return MMInput(content_hash, torch.zeros(1, 3, 1, 1, dtype=torch.uint8), offset, length)


def compute(bm: BlockManager, seq: Sequence, cached: int = 0) -> None:
    """Admit `seq` and pretend the runner computed its whole prompt."""
    assert bm.allocate(seq, seq.num_tokens - cached, cached)
    seq.num_computed_tokens = seq.num_tokens
    bm.cache_full_blocks(seq)


def test_allocate_free_and_eviction_order() -> None:
    bm = BlockManager(num_blocks=10, block_size=BS)
    a = make_seq(list(range(10)))  # 2 full blocks + 2 tokens
    compute(bm, a)
    assert a.block_table == [0, 1, 2]
    assert bm.free_queue() == [3, 4, 5, 6, 7, 8, 9]
    assert bm.num_cached_blocks == 2 and bm.usage == pytest.approx(0.3)
    bm.free(a)
    # Partial block 2 holds nothing reusable: head. Cached 1 then 0 (freed last-to-first): tail.
    assert bm.free_queue() == [2, 3, 4, 5, 6, 7, 8, 9, 1, 0]
    assert a.block_table == [] and bm.num_free_blocks == 10
    bm.free(a)  # idempotent
    bm.check_integrity([a])


def test_prefix_hit_shares_blocks_and_counts_refs() -> None:
    bm = BlockManager(num_blocks=10, block_size=BS)
    a = make_seq(list(range(10)), seq_id=1)
    compute(bm, a)
    b = make_seq([*range(8), 50, 51, 52], seq_id=2)
    assert bm.match_prefix(b) == 8
    assert bm.allocate(b, 3, num_cached_tokens=8)
    assert b.block_table == [0, 1, 3]
    assert [bm.ref_count(i) for i in range(4)] == [2, 2, 1, 1]
    assert (bm.queries, bm.hits) == (10 + 11, 8)
    bm.check_integrity([a, b])
    bm.free(a)
    assert [bm.ref_count(i) for i in range(4)] == [1, 1, 0, 1]
    assert bm.free_queue() == [2, 4, 5, 6, 7, 8, 9]
    bm.free(b)
    assert bm.free_queue() == [3, 2, 4, 5, 6, 7, 8, 9, 1, 0]
    bm.check_integrity([])


def test_hit_touches_cached_free_blocks_out_of_the_queue() -> None:
    bm = BlockManager(num_blocks=6, block_size=BS)
    a = make_seq(list(range(9)), seq_id=1)
    compute(bm, a)
    bm.free(a)
    assert bm.free_queue() == [2, 3, 4, 5, 1, 0]
    b = make_seq(list(range(9)), seq_id=2)
    assert bm.match_prefix(b) == 8
    assert bm.allocate(b, 1, num_cached_tokens=8)
    assert b.block_table == [0, 1, 2]
    assert bm.free_queue() == [3, 4, 5]
    bm.check_integrity([b])


def test_lru_eviction_drops_the_oldest_hash() -> None:
    bm = BlockManager(num_blocks=4, block_size=BS)
    a = make_seq([1] * 4 + [2] * 4 + [3], seq_id=1)
    compute(bm, a)
    bm.free(a)
    assert bm.free_queue() == [2, 3, 1, 0]
    c = make_seq([9] * 12 + [8], seq_id=3)  # needs 4 blocks: evicts everything cached, block 1 before 0
    assert bm.allocate(c, 13)
    assert c.block_table == [2, 3, 1, 0]
    assert bm.num_cached_blocks == 0
    bm.free(c)
    assert bm.match_prefix(make_seq([1] * 4 + [2] * 4 + [3], seq_id=4)) == 0


def test_partial_eviction_keeps_the_older_prefix() -> None:
    bm = BlockManager(num_blocks=5, block_size=BS)
    a = make_seq(list(range(13)), seq_id=1)  # blocks 0..2 full, 3 partial
    compute(bm, a)
    bm.free(a)
    assert bm.free_queue() == [3, 4, 2, 1, 0]
    c = make_seq([7, 7, 7, 7, 7], seq_id=2)
    assert bm.allocate(c, 5) and c.block_table == [3, 4]
    d = make_seq([6, 6, 6], seq_id=3)
    assert bm.allocate(d, 3) and d.block_table == [2]  # evicts a's last full block (the prefix tail)
    assert bm.match_prefix(make_seq(list(range(13)), seq_id=4)) == 8


def test_never_matches_the_whole_prompt() -> None:
    bm = BlockManager(num_blocks=8, block_size=BS)
    compute(bm, make_seq(list(range(8)), seq_id=1))
    assert bm.match_prefix(make_seq(list(range(8)), seq_id=2)) == 4  # one token must be computed
    assert bm.match_prefix(make_seq(list(range(9)), seq_id=3)) == 8


def test_decode_tokens_fill_and_register_blocks() -> None:
    bm = BlockManager(num_blocks=8, block_size=BS)
    a = make_seq([1, 2, 3, 4, 5, 6], seq_id=1)
    compute(bm, a)
    for token in (7, 8, 9):  # decode: each step computes the previous sampled token
        a.token_ids.append(token)
        assert bm.allocate(a, 1)
        a.num_computed_tokens += 1
        bm.cache_full_blocks(a)
    assert a.num_computed_tokens == 9 and a.block_table == [0, 1, 2]
    assert bm.num_cached_blocks == 2
    b = make_seq([1, 2, 3, 4, 5, 6, 7, 8, 100], seq_id=2)
    assert bm.match_prefix(b) == 8


def test_allocate_is_atomic_when_out_of_blocks() -> None:
    bm = BlockManager(num_blocks=3, block_size=BS)
    a = make_seq(list(range(8)), seq_id=1)
    compute(bm, a)
    b = make_seq(list(range(100, 110)), seq_id=2)
    assert not bm.allocate(b, 10)  # needs 3, 1 free
    assert b.block_table == [] and bm.free_queue() == [2] and bm.queries == 8
    b2 = make_seq([*range(8), 1, 2, 3, 4, 5], seq_id=3)
    assert bm.match_prefix(b2) == 8
    assert not bm.allocate(b2, 5, num_cached_tokens=8)  # needs 2 new blocks, 1 free
    assert b2.block_table == [] and [bm.ref_count(i) for i in range(3)] == [1, 1, 0]
    bm.check_integrity([a])


def test_different_images_with_the_same_placeholders_never_share() -> None:
    bm = BlockManager(num_blocks=16, block_size=BS)
    tokens = [1, 2, 3, 4] + [IMG] * 8 + [5, 6, 7]
    a = make_seq(tokens, [image("hash-a", 4, 8)], seq_id=1)
    compute(bm, a)
    other = make_seq(tokens, [image("hash-b", 4, 8)], seq_id=2)
    assert bm.match_prefix(other) == 4  # only the text block before the image
    same = make_seq(tokens, [image("hash-a", 4, 8)], seq_id=3)
    assert bm.match_prefix(same) == 12


def test_media_hash_includes_the_offset() -> None:
    bm = BlockManager(num_blocks=16, block_size=BS)
    tokens = [IMG] * 12 + [5]
    compute(bm, make_seq(tokens, [image("h", 0, 8)], seq_id=1))
    # Same token ids, same image, but its rows start 2 positions later: block 0 holds different rows.
    assert bm.match_prefix(make_seq(tokens, [image("h", 2, 8)], seq_id=2)) == 0
    assert bm.match_prefix(make_seq(tokens, [image("h", 0, 8)], seq_id=3)) == 12


def test_hit_is_verified_against_token_ids() -> None:
    bm = BlockManager(num_blocks=8, block_size=BS)
    a = make_seq(list(range(9)), seq_id=1)
    compute(bm, a)
    forged = make_seq([9, 9, 9, 9, 9, 9, 9, 9, 9], seq_id=2)
    forged.block_hashes = list(a.block_hashes)  # simulate a hash collision
    assert bm.match_prefix(forged) == 0


def test_duplicate_content_is_not_registered_twice() -> None:
    bm = BlockManager(num_blocks=8, block_size=BS)
    a, b = make_seq(list(range(5)), seq_id=1), make_seq(list(range(5)), seq_id=2)
    assert bm.allocate(a, 5) and bm.allocate(b, 5)  # both admitted before either was computed
    for seq in (a, b):
        seq.num_computed_tokens = 5
        bm.cache_full_blocks(seq)
    assert a.block_table == [0, 1] and b.block_table == [2, 3] and bm.num_cached_blocks == 1
    bm.free(b)  # block 2 duplicates block 0's content: unregistered, so reused first
    assert bm.free_queue() == [2, 3, 4, 5, 6, 7]
    bm.check_integrity([a])


def test_prefix_caching_disabled() -> None:
    bm = BlockManager(num_blocks=8, block_size=BS, enable_prefix_caching=False)
    compute(bm, make_seq(list(range(9)), seq_id=1))
    assert bm.num_cached_blocks == 0
    assert bm.match_prefix(make_seq(list(range(9)), seq_id=2)) == 0


def test_integrity_detects_leaks_and_bad_refcounts() -> None:
    bm = BlockManager(num_blocks=4, block_size=BS)
    a = make_seq(list(range(6)), seq_id=1)
    assert bm.allocate(a, 6)
    bm.check_integrity([a])
    with pytest.raises(AssertionError, match="leak"):
        bm.check_integrity([])  # a's blocks are referenced by nobody we know of
    a.block_table = []  # lost without free(): a leak
    with pytest.raises(AssertionError):
        bm.check_integrity([a])


def test_a_cache_salt_separates_prefix_caches() -> None:
    """Same tokens, different salts: no shared blocks (no cross-tenant cache probing); same salt: shared."""
    bm = BlockManager(num_blocks=20, block_size=BS)
    tokens = list(range(1, 13))
    unsalted = make_seq(tokens, seq_id=0)
    compute(bm, unsalted)
    tenant_a = make_seq(tokens, seq_id=1)
    tenant_a.cache_salt = "tenant-a"
    assert bm.match_prefix(tenant_a) == 0
    compute(bm, tenant_a)
    again_a = make_seq(tokens, seq_id=2)
    again_a.cache_salt = "tenant-a"
    tenant_b = make_seq(tokens, seq_id=3)
    tenant_b.cache_salt = "tenant-b"
    plain = make_seq(tokens, seq_id=4)
    assert bm.match_prefix(again_a) == 8 and bm.match_prefix(tenant_b) == 0 and bm.match_prefix(plain) == 8
    # the salt changes only the chain's root: later blocks still chain from their parents
    assert tenant_a.block_hashes[0] != unsalted.block_hashes[0]
    assert tenant_a.block_hashes[1] != unsalted.block_hashes[1]
