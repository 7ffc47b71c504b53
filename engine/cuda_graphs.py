"""CUDA graphs of decode-only steps, captured at start-up for bucketed batch sizes.

A decode step of a small model is hundreds of tiny kernels; launched one by one from Python they cost more
than the step's memory traffic. Each bucket size gets one graph of the whole decoder forward (embedding to the
final norm), reading static input buffers and writing a static [bs, hidden] output; the LM head (one GEMM) runs
after it on the rows that exist, so no graph keeps a [bs, vocab] buffer alive in the pool. A step with B decodes
(B <= the largest bucket) fills the first B rows of the static buffers, pads the rest of its bucket with inert
rows (slot -1: no KV write; context length 0; token 0 at position 0) and replays the bucket's graph; its hidden
states are the first B rows of the output. Steps with prefill chunks, and larger batches, run eagerly.

Graphs are captured largest first into one memory pool (smaller ones reuse the largest one's memory), after a
warm-up run of each that lets kernels compile and the allocator settle. Only an attention backend that reads
nothing but the device tensors of `AttentionMetadata` can be captured (it says so with a `cuda_graph_safe =
True` class attribute). `graph_factory` makes the graph objects: `CudaGraph` on the GPU; tests pass a stand-in
that records the callable at capture and calls it again at replay, which checks the bucketing, padding and
buffer handling on the CPU.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from typing import Any, Protocol

import torch

from plm_serve.engine.attention import AttentionMetadata
from plm_serve.engine.device_state import StepBatch

logger = logging.getLogger(__name__)


MAX_GRAPH_BATCH = 512  # bounds capture time and pool memory; larger decode batches are launch-bound no more


def graph_buckets(max_num_seqs: int) -> list[int]:
    """Batch sizes that get a graph: 1, 2, 4, 8, then every multiple of 16, up to (and including) the largest,
    min(max_num_seqs, MAX_GRAPH_BATCH)."""
    max_batch = min(max_num_seqs, MAX_GRAPH_BATCH)
    sizes = [b for b in (1, 2, 4, 8) if b <= max_batch] + list(range(16, max_batch + 1, 16))
    if sizes[-1] != max_batch:
        sizes.append(max_batch)
    return sizes


class Graph(Protocol):
    def capture(self, fn: Callable[[], torch.Tensor], pool: object) -> torch.Tensor: ...
    def replay(self) -> None: ...


class CudaGraph:
    """A torch.cuda.CUDAGraph of `fn`, warmed up once on a side stream before capture (as PyTorch advises)."""

    def __init__(self) -> None:
        self.graph = torch.cuda.CUDAGraph()

    @staticmethod
    def new_pool() -> Any:
        return torch.cuda.graph_pool_handle()

    def capture(self, fn: Callable[[], torch.Tensor], pool: Any) -> torch.Tensor:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            fn()
        torch.cuda.current_stream().wait_stream(side)
        with torch.cuda.graph(self.graph, pool=pool):
            return fn()

    def replay(self) -> None:
        self.graph.replay()


class StaticDecodeInputs:
    """The buffers every decode graph reads: row i of a bucket of size bs is row i of each, for i < bs."""

    def __init__(self, max_batch: int, max_blocks: int, device: torch.device) -> None:
        self.max_batch = max_batch
        self.input_ids = torch.zeros(max_batch, dtype=torch.int64, device=device)
        self.positions = torch.zeros(max_batch, dtype=torch.int64, device=device)
        self.slot_mapping = torch.full((max_batch,), -1, dtype=torch.int64, device=device)
        self.context_lens = torch.zeros(max_batch, dtype=torch.int64, device=device)
        self.block_tables = torch.zeros((max_batch, max_blocks), dtype=torch.int32, device=device)
        # Every row of a decode bucket is a one-token query, padding included: query_start is arange(bs + 1).
        self.query_start = torch.arange(max_batch + 1, dtype=torch.int32, device=device)
        self._metadata: dict[int, AttentionMetadata] = {}

    def metadata(self, bs: int) -> AttentionMetadata:
        """The bucket's metadata: views of the static buffers (its host mirrors are refreshed by `fill`)."""
        if bs not in self._metadata:
            self._metadata[bs] = AttentionMetadata(
                slot_mapping=self.slot_mapping[:bs],
                block_tables=self.block_tables[:bs],
                context_lens=self.context_lens[:bs],
                query_lens=[1] * bs,
                context_lens_host=[0] * bs,
                query_start=self.query_start[: bs + 1],
                max_query_len=1,
            )
        return self._metadata[bs]

    def fill(self, batch: StepBatch, full_tables: torch.Tensor, bs: int) -> None:
        """Copy a decode-only batch of B <= bs rows in, and make rows B..bs-1 inert padding.

        `full_tables` [B, max_blocks] are the batch's block tables at full width (zeros past each table).
        """
        b = batch.num_rows
        self.input_ids[:b].copy_(batch.input_ids)
        self.positions[:b].copy_(batch.positions)
        self.slot_mapping[:b].copy_(batch.metadata.slot_mapping)
        self.context_lens[:b].copy_(batch.metadata.context_lens)
        self.block_tables[:b].copy_(full_tables)
        if b < bs:
            self.input_ids[b:bs].zero_()
            self.positions[b:bs].zero_()
            self.slot_mapping[b:bs].fill_(-1)
            self.context_lens[b:bs].zero_()
            self.block_tables[b:bs].zero_()
        host = self.metadata(bs).context_lens_host  # what an eager backend under a stand-in graph reads
        host[:b] = batch.metadata.context_lens_host
        host[b:] = [0] * (bs - b)


class DecodeGraphs:
    """One captured graph per bucket size; `run()` replays the smallest bucket that fits a decode batch."""

    def __init__(
        self,
        static: StaticDecodeInputs,
        forward: Callable[[int], torch.Tensor],
        buckets: list[int],
        graph_factory: Callable[[], Graph],
        new_pool: Callable[[], object],
    ) -> None:
        self.static = static
        self.forward = forward  # forward(bs) -> hidden [bs, H] from the static buffers' first bs rows
        self.buckets = sorted(buckets)
        self.graph_factory = graph_factory
        self.new_pool = new_pool
        self._graphs: dict[int, tuple[Graph, torch.Tensor]] = {}

    @property
    def max_batch(self) -> int:
        return self.buckets[-1]

    def capture(self) -> float:
        """Capture every bucket, largest first into one pool; returns the seconds it took."""
        t0 = time.perf_counter()
        pool = self.new_pool()
        for bs in reversed(self.buckets):
            graph = self.graph_factory()
            self.static.metadata(bs)  # host mirrors of padding rows: context 0
            out = graph.capture(functools.partial(self.forward, bs), pool)
            self._graphs[bs] = (graph, out)
        seconds = time.perf_counter() - t0
        logger.info(
            "captured %d decode graphs (batch %d..%d) in %.1fs", len(self.buckets), 1, self.max_batch, seconds
        )
        return seconds

    def bucket_for(self, batch_size: int) -> int | None:
        """The smallest bucket holding `batch_size` rows, or None (run eagerly)."""
        if not self._graphs or batch_size > self.max_batch:
            return None
        return next(b for b in self.buckets if b >= batch_size)

    def run(self, batch: StepBatch, full_tables: torch.Tensor, bs: int) -> torch.Tensor:
        """Replay bucket `bs` on `batch`; returns its hidden states [B, H] (a view of the graph's output)."""
        self.static.fill(batch, full_tables, bs)
        graph, out = self._graphs[bs]
        graph.replay()
        return out[: batch.num_rows]
