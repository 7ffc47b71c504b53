"""Snapshot of the scheduler's counters for metrics (the caller feeds Prometheus from it)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class SchedulerStats:
    num_running: int  # sequences holding KV blocks
    num_waiting: int  # sequences queued (new, preempted, or n>1 children held back)
    kv_usage: float  # fraction of KV blocks held by sequences (cached-free blocks count as free)
    num_free_blocks: int
    num_total_blocks: int
    prefix_cache_queries: int  # cumulative prompt tokens looked up at admissions
    prefix_cache_hits: int  # cumulative tokens served from the prefix cache
    encoder_cache_hits: int  # cumulative media references served without encoding
    encoder_cache_misses: int  # cumulative media items encoded
    encoder_cache_entries: int
    num_preemptions: int  # cumulative

    @property
    def prefix_cache_hit_rate(self) -> float:
        return self.prefix_cache_hits / self.prefix_cache_queries if self.prefix_cache_queries else 0.0
