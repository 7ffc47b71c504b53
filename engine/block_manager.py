"""Paged KV-cache bookkeeping with prefix caching: pure CPU Python, no tensors.

Public API (counts in tokens unless named *_blocks):
    bm = BlockManager(num_blocks, block_size, enable_prefix_caching=True)
    bm.match_prefix(seq) -> int      # read-only: cached tokens at the start of seq (< seq.num_tokens)
    bm.allocate(seq, num_new_tokens, num_cached_tokens=0) -> bool   # atomic: all blocks or nothing
    bm.cache_full_blocks(seq)        # after the runner computed tokens: register newly full blocks
    bm.free(seq, uncache=False)      # idempotent; cached blocks keep their hash unless uncache
    bm.num_free_blocks, bm.usage, bm.queries, bm.hits, bm.check_integrity(seqs)

Pool: block ids 0..num_blocks-1. A block is either *used* (ref_count > 0, in at least one block table)
or *free* (ref_count == 0, in the free queue). A free block may still carry the hash of its content
("cached-free"): a later prefix hit "touches" it out of the free queue instead of recomputing it.
The free queue is in eviction order: allocation takes its head (dropping the old hash); freed blocks
with a hash go to the tail (least recently used first); freed blocks without a hash go to the head
(they hold nothing worth keeping). A sequence's blocks are freed last-to-first, so a prompt's tail is
evicted before its head (prefixes are what other requests share).

Block hash (FULL blocks only): blake2b-256 over (parent block hash, the block's token ids as int64,
extra keys). The extra keys list `content_hash@offset` of every image/video whose placeholder range
overlaps the block: all placeholders have the same token id (128002 / 128003), so without them two
prompts with the same text but different images would share KV. Hits are verified against the stored
token ids (collision guard). A sequence with a `cache_salt` starts its chain from a hash of the salt instead
of the root, so its blocks can only ever match requests with the same salt.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Iterable

from plm_serve.engine.sequence import Sequence

_ROOT_HASH = b"plm-serve/kv-block/v1"


class BlockManager:
    """Owns the block pool, reference counts and the hash -> block map of the prefix cache."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need num_blocks >= 1 and block_size >= 1, got {num_blocks}, {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        # Per-block state in flat lists (faster than one object per block on the per-step path).
        self._ref = [0] * num_blocks
        self._hash: list[bytes | None] = [None] * num_blocks
        self._tokens: list[tuple[int, ...] | None] = [None] * num_blocks  # kept to verify hits
        # Free queue in eviction order (head = next to reuse); OrderedDict gives O(1) pop/remove/append.
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self._cached: dict[bytes, int] = {}  # block hash -> block id (used or cached-free)
        self.queries = 0  # prompt tokens looked up at admissions
        self.hits = 0  # of which served from the cache

    # ----------------------------------------------------------------------------------------------- queries

    @property
    def num_free_blocks(self) -> int:
        """Blocks available to allocate (never-used, freed and cached-free ones)."""
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    @property
    def num_cached_blocks(self) -> int:
        """Blocks registered in the prefix cache (used or free)."""
        return len(self._cached)

    @property
    def usage(self) -> float:
        """Fraction of the pool held by sequences (cached-free blocks count as free)."""
        return self.num_used_blocks / self.num_blocks

    def free_queue(self) -> list[int]:
        """The free block ids in eviction order (head first). For tests and debugging."""
        return list(self._free)

    def ref_count(self, block_id: int) -> int:
        return self._ref[block_id]

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # ---------------------------------------------------------------------------------------------- hashing

    def _ensure_hashes(self, seq: Sequence, num_full_blocks: int) -> None:
        """Extend `seq.block_hashes` to its first `num_full_blocks` blocks (each hashed once per seq)."""
        hashes = seq.block_hashes
        bs = self.block_size
        for i in range(len(hashes), num_full_blocks):
            parent = hashes[i - 1] if i else _root_hash(seq.cache_salt)
            digest = hashlib.blake2b(parent, digest_size=32)
            digest.update(array("q", seq.token_ids[i * bs : (i + 1) * bs]).tobytes())
            if seq.mm_inputs:
                digest.update(_media_keys(seq, i * bs, (i + 1) * bs))
            hashes.append(digest.digest())

    def _lookup(self, seq: Sequence, index: int) -> int | None:
        """The cached block holding block `index` of `seq`, verified token by token, or None."""
        block_id = self._cached.get(seq.block_hashes[index])
        if block_id is None:
            return None
        bs = self.block_size
        if self._tokens[block_id] != tuple(seq.token_ids[index * bs : (index + 1) * bs]):
            return None  # a hash collision: never share KV of different tokens
        return block_id

    # ------------------------------------------------------------------------------------------- operations

    def match_prefix(self, seq: Sequence) -> int:
        """Tokens at the start of `seq.token_ids` whose KV is cached (a multiple of block_size). Read-only.

        At least one token is always left to compute, so the runner gets logits to sample from.
        """
        if not self.enable_prefix_caching:
            return 0
        max_blocks = (seq.num_tokens - 1) // self.block_size
        self._ensure_hashes(seq, max_blocks)
        hit = 0
        while hit < max_blocks and self._lookup(seq, hit) is not None:
            hit += 1
        return hit * self.block_size

    def allocate(self, seq: Sequence, num_new_tokens: int, num_cached_tokens: int = 0) -> bool:
        """Grow `seq.block_table` to cover `num_computed_tokens + num_cached_tokens + num_new_tokens`
        positions of `seq`.

        `num_cached_tokens` (the result of `match_prefix`) is only for a sequence holding no blocks:
        its cached blocks are shared (touched out of the free queue, ref_count + 1) instead of
        allocated. Atomic: returns False and changes nothing when the free queue is too short.
        """
        table = seq.block_table
        if not table:
            return self._admit(seq, num_new_tokens, num_cached_tokens)
        assert num_cached_tokens == 0, "prefix hits only at admission"
        # Per-step hot path (decode): usually no new block at all.
        target = seq.num_computed_tokens + num_new_tokens
        num_new_blocks = -(-target // self.block_size) - len(table)
        if num_new_blocks <= 0:
            return True
        if num_new_blocks > len(self._free):
            return False
        for _ in range(num_new_blocks):
            table.append(self._pop_free())
        return True

    def _admit(self, seq: Sequence, num_new_tokens: int, num_cached_tokens: int) -> bool:
        """First allocation of a sequence: share its cached prefix blocks, allocate the rest."""
        assert seq.num_computed_tokens == 0, "a sequence without blocks has nothing computed"
        found = [self._lookup(seq, i) for i in range(num_cached_tokens // self.block_size)]
        hits = [b for b in found if b is not None]
        assert len(hits) == len(found), "the cache changed between match_prefix and allocate"
        num_new_blocks = self.blocks_needed(num_cached_tokens + num_new_tokens) - len(hits)
        num_touched_free = sum(1 for b in hits if self._ref[b] == 0)
        if num_new_blocks + num_touched_free > len(self._free):
            return False
        self.queries += seq.num_tokens
        self.hits += num_cached_tokens
        table = seq.block_table
        for block_id in hits:
            self._touch(block_id)
            table.append(block_id)
        seq.num_cached_blocks = len(hits)
        for _ in range(num_new_blocks):
            table.append(self._pop_free())
        return True

    def cache_full_blocks(self, seq: Sequence) -> None:
        """Register the blocks of `seq` that became full of computed tokens (prompt or decode).

        A block whose hash is already cached elsewhere (same content computed twice) stays unregistered.
        """
        num_full = seq.num_computed_tokens // self.block_size
        if num_full <= seq.num_cached_blocks or not self.enable_prefix_caching:
            return
        self._ensure_hashes(seq, num_full)
        bs = self.block_size
        for i in range(seq.num_cached_blocks, num_full):
            block_hash = seq.block_hashes[i]
            if block_hash not in self._cached:
                block_id = seq.block_table[i]
                self._cached[block_hash] = block_id
                self._hash[block_id] = block_hash
                self._tokens[block_id] = tuple(seq.token_ids[i * bs : (i + 1) * bs])
        seq.num_cached_blocks = num_full

    def free(self, seq: Sequence, uncache: bool = False) -> None:
        """Release every block of `seq` (idempotent). Hashes stay: they describe content, not blocks; with
        `uncache`, the blocks nobody else holds forget theirs (their content is not to be trusted)."""
        ref = self._ref
        for block_id in reversed(seq.block_table):
            ref[block_id] -= 1
            if ref[block_id] == 0:
                self._free[block_id] = None
                block_hash = self._hash[block_id]
                if uncache and block_hash is not None:
                    del self._cached[block_hash]
                    self._hash[block_id] = None
                    self._tokens[block_id] = None
                if self._hash[block_id] is None:
                    self._free.move_to_end(block_id, last=False)
        seq.block_table = []
        seq.num_cached_blocks = 0

    def _touch(self, block_id: int) -> None:
        if self._ref[block_id] == 0:
            del self._free[block_id]
        self._ref[block_id] += 1

    def _pop_free(self) -> int:
        block_id, _ = self._free.popitem(last=False)
        old = self._hash[block_id]
        if old is not None:  # evict: the content is about to be overwritten
            del self._cached[old]
            self._hash[block_id] = None
            self._tokens[block_id] = None
        self._ref[block_id] = 1
        return block_id

    # -------------------------------------------------------------------------------------------- integrity

    def check_integrity(self, seqs: Iterable[Sequence] | None = None) -> None:
        """Raise AssertionError if the pool is inconsistent.

        Checks: free queue + used blocks == total; ref_count == 0 exactly for the blocks in the free
        queue; the hash map and per-block hashes agree; with `seqs` (every sequence holding blocks), each
        ref_count equals the number of block tables containing the block.
        """
        free = set(self._free)
        assert len(free) == len(self._free), "a block is twice in the free queue"
        used = sum(1 for r in self._ref if r > 0)
        total = self.num_blocks
        assert len(free) + used == total, f"free {len(free)} + used {used} != total {total}"
        for block_id, r in enumerate(self._ref):
            assert r >= 0, f"block {block_id}: negative ref_count {r}"
            is_free = block_id in free
            assert (r == 0) == is_free, f"block {block_id}: ref_count {r} but free={is_free}"
            h = self._hash[block_id]
            assert h is None or self._cached.get(h) == block_id, f"block {block_id}: hash not in the map"
        for h, block_id in self._cached.items():
            assert self._hash[block_id] == h, f"cache map entry for block {block_id} has a stale hash"
        if seqs is not None:
            counts = [0] * self.num_blocks
            for seq in seqs:
                for block_id in seq.block_table:
                    counts[block_id] += 1
            assert counts == self._ref, "ref_counts differ from the block tables (leak or double free)"


def _root_hash(cache_salt: str | None) -> bytes:
    """The parent of a sequence's first block: the shared root, or the root keyed with the salt."""
    if cache_salt is None:
        return _ROOT_HASH
    salt = cache_salt.encode("utf-8", "surrogatepass")
    return hashlib.blake2b(salt, digest_size=32, key=_ROOT_HASH[:32], person=b"cache-salt").digest()


def _media_keys(seq: Sequence, start: int, end: int) -> bytes:
    """Extra hash keys of block [start, end): each media item overlapping it, with its placeholder offset."""
    keys = [
        f"{item.content_hash}@{item.offset}".encode()
        for item in seq.mm_inputs
        if item.offset < end and item.offset + item.length > start
    ]
    return b"|".join(keys)
