"""Logical vision-encoder output cache (bookkeeping only) and the media planning of a prefill chunk.

The model runner keeps the tensors (`dict[content_hash -> embeddings [length, hidden]]`); this class
decides what is in it. Public API:
    cache = EncoderCache(capacity_rows)
    cache.contains(h); cache.add_ref(h, owner); cache.allocate(h, rows, owner); cache.release(h, owner)
    cache.take_freed() -> list[str]   # evicted since the last call: the runner drops those tensors
    cache.hits, cache.misses, cache.queries
    plan_media(cache, items, start, num_tokens, budget, ready, encode_ahead) -> MediaPlan   # read-only

Invariants:
  * An entry exists from the step that schedules its encoding until it is evicted; while it exists
    the item is never encoded again (a repeated image is encoded once).
  * `owners` are the sequences whose prefill still has to pass the item's placeholder range. Entries
    without owners sit in the LRU `freeable` list (oldest first) and are evicted lazily, only when
    space is needed.
  * used rows (referenced + freeable entries) <= capacity.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Collection
from dataclasses import dataclass, field

from plm_serve.engine.request import MMInput


@dataclass(slots=True)
class _Entry:
    rows: int
    owners: set[int] = field(default_factory=set)


class EncoderCache:
    """Which encoder outputs are cached, who still needs them, which were evicted (sized in rows)."""

    def __init__(self, capacity_rows: int) -> None:
        self.capacity = capacity_rows
        self._entries: dict[str, _Entry] = {}
        self._freeable: OrderedDict[str, int] = OrderedDict()  # hash -> rows, oldest release first
        self._used_rows = 0
        self._freeable_rows = 0
        self._freed: list[str] = []
        self.hits = 0  # references to an entry already cached (or scheduled this step)
        self.misses = 0  # allocations, i.e. items encoded

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def queries(self) -> int:
        """Media references made by scheduled chunks (hits + misses)."""
        return self.hits + self.misses

    def contains(self, content_hash: str) -> bool:
        return content_hash in self._entries

    @property
    def available_rows(self) -> int:
        """Rows an allocation could get now: free space plus every freeable (unreferenced) entry."""
        return self.capacity - self._used_rows + self._freeable_rows

    def freeable_rows_of(self, content_hash: str) -> int:
        """Rows of the entry if it is freeable (would be evictable), else 0."""
        return self._freeable.get(content_hash, 0)

    def num_owners(self, content_hash: str) -> int:
        entry = self._entries.get(content_hash)
        return len(entry.owners) if entry else 0

    def is_owner(self, content_hash: str, owner: int) -> bool:
        entry = self._entries.get(content_hash)
        return entry is not None and owner in entry.owners

    def add_ref(self, content_hash: str, owner: int) -> None:
        """Reference an existing entry for `owner` (idempotent); a freeable entry stops being evictable."""
        entry = self._entries[content_hash]
        if owner in entry.owners:
            return
        if not entry.owners:
            self._freeable_rows -= self._freeable.pop(content_hash)
        entry.owners.add(owner)
        self.hits += 1

    def allocate(self, content_hash: str, rows: int, owner: int) -> None:
        """Create the entry of an item encoded this step, evicting freeable entries (LRU) for space."""
        assert content_hash not in self._entries, "allocate() of an item that is already cached"
        while self.capacity - self._used_rows < rows:
            if not self._freeable:
                raise RuntimeError(f"encoder cache cannot fit {rows} rows (plan_media should have cut)")
            self._evict_oldest()
        self._entries[content_hash] = _Entry(rows, {owner})
        self._used_rows += rows
        self.misses += 1
        if content_hash in self._freed:  # evicted and re-encoded in one step: the runner overwrites it
            self._freed.remove(content_hash)

    def release(self, content_hash: str, owner: int) -> None:
        """Drop `owner`'s reference (idempotent); the last one makes the entry freeable (LRU tail)."""
        entry = self._entries.get(content_hash)
        if entry is None or owner not in entry.owners:
            return
        entry.owners.discard(owner)
        if not entry.owners:
            self._freeable[content_hash] = entry.rows
            self._freeable_rows += entry.rows

    def discard(self, content_hash: str) -> None:
        """Forget an entry nobody references (its encoding cannot be trusted); no-op otherwise."""
        if content_hash in self._freeable:
            self._evict(content_hash)

    def take_freed(self) -> list[str]:
        """Hashes evicted since the last call (the runner deletes their tensors)."""
        freed, self._freed = self._freed, []
        return freed

    def _evict_oldest(self) -> None:
        self._evict(next(iter(self._freeable)))

    def _evict(self, content_hash: str) -> None:
        rows = self._freeable.pop(content_hash)
        del self._entries[content_hash]
        self._used_rows -= rows
        self._freeable_rows -= rows
        self._freed.append(content_hash)

    def check_integrity(self, live_owners: Collection[int] | None = None) -> None:
        """Raise AssertionError on bad accounting or (with `live_owners`) references of dead owners."""
        assert self._used_rows == sum(e.rows for e in self._entries.values()), "used rows drifted"
        assert self._used_rows <= self.capacity, "over capacity"
        unowned = {h for h, e in self._entries.items() if not e.owners}
        assert unowned == set(self._freeable), "freeable list differs from the unreferenced entries"
        assert self._freeable_rows == sum(self._freeable.values()), "freeable rows drifted"
        if live_owners is not None:
            live = set(live_owners)
            for h, entry in self._entries.items():
                assert entry.owners <= live, f"entry {h[:12]} referenced by finished/unknown sequences"


@dataclass(slots=True)
class EncoderBudget:
    """Encoder compute left in the current step (tiles). The first item of a step is always allowed."""

    tiles_left: int
    num_items: int = 0

    def allows(self, tiles: int, planned_items: int) -> bool:
        return self.num_items + planned_items == 0 or tiles <= self.tiles_left

    def spend(self, tiles: int, num_items: int) -> None:
        self.tiles_left -= tiles
        self.num_items += num_items


@dataclass(slots=True)
class MediaPlan:
    """What a chunk needs from the encoder: its (possibly shortened) length, cached items to reference,
    items to encode this step (deduplicated by hash) and their tiles."""

    num_tokens: int
    refs: list[str] = field(default_factory=list)
    encode: list[MMInput] = field(default_factory=list)
    tiles: int = 0


def plan_media(
    cache: EncoderCache,
    items: list[MMInput],
    start: int,
    num_tokens: int,
    budget: EncoderBudget,
    ready: Callable[[str], bool] | None = None,
    encode_ahead: bool = False,
) -> MediaPlan:
    """Plan the media of chunk [start, start + num_tokens) of a sequence whose media are `items` (sorted).

    Every item overlapping the chunk must be cached or encoded this step (within `budget` and the
    cache space); the chunk is cut before the first item that cannot be (to 0 tokens if the chunk
    starts inside it). With an asynchronous encoder the chunk is also cut before an item whose encoding
    is still running (`ready(hash)` false) and, with `encode_ahead`, before an item encoded this very step:
    its embeddings are consumed by a later step, so the step's decodes never wait for the vision tower.
    Items past such a cut are still referenced or encoded (so several images encode together). Read-only.
    """
    plan = MediaPlan(num_tokens)
    end = start + num_tokens
    usable_end = end  # where the chunk must stop
    planned: set[str] = set()
    pinned_rows = 0  # freeable rows this plan will reference: not evictable for its own allocations
    new_rows = 0
    for item in items:
        if item.offset + item.length <= start:
            continue
        if item.offset >= end:
            break
        h = item.content_hash
        if h in planned:
            continue
        if cache.contains(h):
            plan.refs.append(h)
            pinned_rows += cache.freeable_rows_of(h)
            if ready is not None and not ready(h):
                usable_end = min(usable_end, item.offset)
        elif budget.allows(plan.tiles + item.num_tiles, len(plan.encode)) and (
            new_rows + item.length <= cache.available_rows - pinned_rows
        ):
            plan.encode.append(item)
            plan.tiles += item.num_tiles
            new_rows += item.length
            if encode_ahead:
                usable_end = min(usable_end, item.offset)
        else:
            usable_end = min(usable_end, item.offset)
            break
        planned.add(h)
    plan.num_tokens = max(usable_end - start, 0)
    return plan
