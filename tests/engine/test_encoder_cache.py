"""EncoderCache (refs, LRU reclaim, freed-hash reporting) and plan_media (encoder budget, cuts)."""

from __future__ import annotations

import pytest
import torch

from plm_serve.engine.encoder_cache import EncoderBudget, EncoderCache, plan_media
from plm_serve.engine.request import MMInput


def item(h: str, offset: int, length: int, tiles: int = 1) -> MMInput:
    return MMInput(h, torch.zeros(tiles, 3, 1, 1, dtype=torch.uint8), offset, length)


def test_refs_freeable_and_lazy_lru_eviction() -> None:
    cache = EncoderCache(capacity_rows=10)
    cache.allocate("a", 4, owner=1)
    cache.allocate("b", 4, owner=2)
    cache.add_ref("a", owner=3)
    assert (cache.hits, cache.misses, cache.queries) == (1, 2, 3)
    assert cache.available_rows == 2
    cache.release("a", 1)
    assert cache.available_rows == 2  # still referenced by 3
    cache.release("a", 3)
    cache.release("b", 2)
    cache.release("b", 2)  # idempotent
    assert cache.available_rows == 10 and len(cache) == 2  # freeable entries stay cached
    assert cache.take_freed() == []
    cache.allocate("c", 5, owner=4)  # needs 5, has 2 free: evicts the oldest released ("a")
    assert cache.contains("b") and not cache.contains("a")
    assert cache.take_freed() == ["a"]
    assert cache.take_freed() == []
    cache.check_integrity(live_owners={4})


def test_add_ref_revives_a_freeable_entry() -> None:
    cache = EncoderCache(capacity_rows=8)
    cache.allocate("a", 4, owner=1)
    cache.release("a", 1)
    cache.add_ref("a", owner=2)
    cache.allocate("b", 4, owner=3)
    with pytest.raises(RuntimeError):
        cache.allocate("c", 4, owner=4)  # nothing evictable
    assert cache.take_freed() == []
    cache.check_integrity(live_owners={2, 3})


def test_integrity_detects_dead_owners() -> None:
    cache = EncoderCache(capacity_rows=8)
    cache.allocate("a", 4, owner=1)
    with pytest.raises(AssertionError):
        cache.check_integrity(live_owners=set())


def test_evicted_and_reallocated_in_one_step_is_not_reported() -> None:
    cache = EncoderCache(capacity_rows=4)
    cache.allocate("a", 4, owner=1)
    cache.release("a", 1)
    cache.allocate("b", 4, owner=2)
    cache.release("b", 2)
    cache.allocate("a", 4, owner=3)  # evicts b ... and a came back
    assert cache.take_freed() == ["b"]


def test_plan_cuts_before_an_item_over_the_tile_budget() -> None:
    cache = EncoderCache(capacity_rows=100)
    items = [item("x", 2, 8, tiles=2), item("y", 12, 8, tiles=2)]
    plan = plan_media(cache, items, start=0, num_tokens=30, budget=EncoderBudget(tiles_left=3))
    assert plan.num_tokens == 12 and [m.content_hash for m in plan.encode] == ["x"] and plan.tiles == 2


def test_plan_always_allows_one_item_per_step() -> None:
    cache = EncoderCache(capacity_rows=100)
    items = [item("big", 0, 40, tiles=10)]
    budget = EncoderBudget(tiles_left=4)
    plan = plan_media(cache, items, start=0, num_tokens=50, budget=budget)
    assert plan.num_tokens == 50 and len(plan.encode) == 1
    budget.spend(plan.tiles, len(plan.encode))
    again = plan_media(cache, [item("other", 0, 8)], start=0, num_tokens=8, budget=budget)
    assert again.num_tokens == 0  # the step already encoded something and its budget is spent


def test_plan_references_cached_items_and_dedups_repeats() -> None:
    cache = EncoderCache(capacity_rows=100)
    cache.allocate("x", 8, owner=9)
    items = [item("x", 0, 8), item("y", 8, 8), item("y", 16, 8)]
    plan = plan_media(cache, items, start=4, num_tokens=24, budget=EncoderBudget(tiles_left=1))
    assert plan.num_tokens == 24 and plan.refs == ["x"]
    assert [m.offset for m in plan.encode] == [8]  # the second "y" reuses the first's encoding


def test_plan_cut_inside_an_item_gives_zero_tokens() -> None:
    cache = EncoderCache(capacity_rows=100)
    cache.allocate("z", 10, owner=1)
    spent = EncoderBudget(tiles_left=0, num_items=1)  # this step already encoded an item
    plan = plan_media(cache, [item("x", 0, 8)], start=4, num_tokens=10, budget=spent)
    assert plan.num_tokens == 0  # x (evicted) is needed from row 4 on, and it cannot be encoded now
    plan = plan_media(cache, [item("x", 0, 8)], start=8, num_tokens=10, budget=spent)
    assert plan.num_tokens == 10  # past the item: nothing needed


def test_plan_respects_cache_space_and_pinned_entries() -> None:
    cache = EncoderCache(capacity_rows=16)
    cache.allocate("old", 8, owner=1)
    cache.release("old", 1)  # freeable: evictable for space
    fits = plan_media(cache, [item("new", 0, 16)], start=0, num_tokens=16, budget=EncoderBudget(10))
    assert fits.num_tokens == 16
    # The chunk references "old" too, so "old" cannot make room for "new".
    items = [item("old", 0, 8), item("new", 8, 16)]
    plan = plan_media(cache, items, start=0, num_tokens=24, budget=EncoderBudget(10))
    assert plan.num_tokens == 8 and plan.refs == ["old"] and plan.encode == []
