"""The runner's state of the running sequences, kept on the device slot by slot and updated by diffs.

A slot (0 .. max_num_seqs - 1, assigned by the scheduler) holds one running sequence:
    tokens[slot, p]       the token at position p (from `NewSequence.token_ids`, or sampled on the device)
    block_table[slot, i]  its KV block i (0 beyond the table, the padding the attention contract expects)
    sampling rows         its sampling parameters and penalty counts (`SamplingTable`)
Each step stages only what changed (new sequences' tokens and tables, the blocks appended to running ones, the
step's chunk list) through pinned memory (`HostStaging`) with one non-blocking copy, and computes the step's
input ids, positions, slot mapping and attention metadata with a handful of device ops. A decode row's input
is `tokens[slot, p]`, written by the previous step's sampler on the device: the host need not know it yet,
which is what lets the overlapped loop prepare step N+1 before step N's tokens are back. Nothing here waits
for the device.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch

from plm_serve.engine.attention import AttentionMetadata
from plm_serve.engine.sampler import SamplerOutput, SamplingRows, SamplingTable
from plm_serve.engine.scheduler_output import MediaSlice, SchedulerOutput
from plm_serve.engine.staging import HostStaging


@dataclass
class StepBatch:
    """The flattened inputs of one step (T rows, B chunks, S sampled rows), all on the device."""

    input_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64
    metadata: AttentionMetadata
    slots: torch.Tensor  # [B] int64: the slot of each chunk
    sample_rows: torch.Tensor  # [S] int64: rows whose logits are sampled, in chunk order
    sample_seq_ids: list[int]  # host: the sequence of each sampled row
    sampling: SamplingRows | None  # None when nothing samples
    media_rows: torch.Tensor | None  # [M] int64: rows whose embeddings come from encoder outputs
    media: list[MediaSlice]  # the slices filling `media_rows`, in order
    is_decode_only: bool

    @property
    def num_rows(self) -> int:
        return self.input_ids.shape[0]


class DeviceBatchState:
    """Per-slot device tables plus the host mirrors needed to build a step without reading them back."""

    def __init__(
        self,
        max_num_seqs: int,
        max_model_len: int,
        block_size: int,
        vocab_size: int,
        device: torch.device,
        eos_token_ids: Iterable[int] = (),
    ) -> None:
        self.device = device
        self.block_size = block_size
        self.max_blocks = -(-max_model_len // block_size)
        self.token_width = max_model_len + 1  # the token sampled after the last position has a place too
        self.tokens = torch.zeros((max_num_seqs, self.token_width), dtype=torch.int64, device=device)
        self.block_table = torch.zeros((max_num_seqs, self.max_blocks), dtype=torch.int32, device=device)
        self.sampling = SamplingTable(max_num_seqs, vocab_size, device, eos_token_ids)
        self.staging = HostStaging(device)
        self._num_blocks = np.zeros(max_num_seqs, dtype=np.int64)  # host mirror: each slot's table length
        self._num_prompt = np.zeros(max_num_seqs, dtype=np.int64)

    def prepare(self, out: SchedulerOutput) -> StepBatch:
        """Apply the step's diffs and build its inputs (no host sync; `out.chunks` must not be empty)."""
        st = self.staging.begin()
        table_writes = self._stage_new_sequences(out, st)
        chunks = out.chunks
        n = len(chunks)
        slots = np.fromiter((c.slot for c in chunks), dtype=np.int64, count=n)
        starts = np.fromiter((c.start for c in chunks), dtype=np.int64, count=n)
        lens = np.fromiter((c.num_tokens for c in chunks), dtype=np.int64, count=n)
        sampling = np.fromiter((c.sample for c in chunks), dtype=bool, count=n)
        query_start = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(lens, out=query_start[1:])
        context = starts + lens
        decode_only = bool((lens == 1).all() and sampling.all())
        h_chunks = st.add(np.concatenate([slots, starts, lens, context, query_start]))

        sample_idx = np.flatnonzero(sampling)
        pending = None
        if sample_idx.size:
            s_slots = slots[sample_idx]
            write_pos = context[sample_idx]
            counters = write_pos - self._num_prompt[s_slots]
            pending = self.sampling.stage(st, s_slots, write_pos, counters)
        h_sample_rows = st.add(query_start[1:][sample_idx] - 1)

        media: list[MediaSlice] = []
        media_rows: list[np.ndarray] = []
        for i, c in enumerate(chunks):
            for m in c.media:
                media.append(m)
                media_rows.append(query_start[i] + m.chunk_pos + np.arange(m.num_rows, dtype=np.int64))
        h_media = st.add(np.concatenate(media_rows)) if media else None

        st.upload()
        # ---- device work from here on: enqueued after the copy, never read back
        for table, (h_index, h_values) in table_writes:
            table.view(-1)[st.get(h_index)] = st.get(h_values).to(table.dtype)
        b = len(chunks)
        c_slots, c_starts, c_lens, c_context, c_query_start = st.get(h_chunks).split([b, b, b, b, b + 1])
        num_rows = int(query_start[-1])
        if decode_only:
            row_slots, positions = c_slots, c_starts
        else:
            row_chunk = torch.repeat_interleave(
                torch.arange(b, device=self.device), c_lens, output_size=num_rows
            )
            positions = (
                torch.arange(num_rows, device=self.device) - c_query_start[row_chunk] + c_starts[row_chunk]
            )
            row_slots = c_slots[row_chunk]
        bs = self.block_size
        blocks = self.block_table[row_slots, positions // bs].long()
        width = int(self._num_blocks[slots].max())
        metadata = AttentionMetadata(
            slot_mapping=blocks * bs + positions % bs,
            block_tables=self.block_table[c_slots, :width],
            context_lens=c_context,
            query_lens=lens.tolist(),
            context_lens_host=context.tolist(),
            query_start=c_query_start.int(),
            max_query_len=int(lens.max()),
        )
        return StepBatch(
            input_ids=self.tokens[row_slots, positions],
            positions=positions,
            metadata=metadata,
            slots=c_slots,
            sample_rows=st.get(h_sample_rows),
            sample_seq_ids=[chunks[i].seq_id for i in sample_idx.tolist()],
            sampling=pending.finish() if pending is not None else None,
            media_rows=st.get(h_media) if h_media is not None else None,
            media=media,
            is_decode_only=decode_only,
        )

    def _stage_new_sequences(self, out: SchedulerOutput, st) -> list[tuple[torch.Tensor, tuple[int, int]]]:
        """Stage the token rows and block tables of new sequences and the blocks appended to running ones."""
        tok_index, tok_values, blk_index, blk_values = [], [], [], []
        mb, width = self.max_blocks, self.token_width
        for new in out.new_sequences:
            s = new.slot
            tok_index.append(s * width + np.arange(len(new.token_ids), dtype=np.int64))
            tok_values.append(np.asarray(new.token_ids, dtype=np.int64))
            row = np.zeros(mb, dtype=np.int64)  # the whole row: what the previous owner left must go
            row[: len(new.block_ids)] = new.block_ids
            blk_index.append(s * mb + np.arange(mb, dtype=np.int64))
            blk_values.append(row)
            self._num_blocks[s] = len(new.block_ids)
            self._num_prompt[s] = new.num_prompt_tokens
            self.sampling.admit(new)
        for c in out.chunks:
            if c.new_block_ids:
                n0, k = int(self._num_blocks[c.slot]), len(c.new_block_ids)
                blk_index.append(c.slot * mb + np.arange(n0, n0 + k, dtype=np.int64))
                blk_values.append(np.asarray(c.new_block_ids, dtype=np.int64))
                self._num_blocks[c.slot] = n0 + k
        writes = []
        for table, index, values in (
            (self.tokens, tok_index, tok_values),
            (self.block_table, blk_index, blk_values),
        ):
            if index:
                writes.append((table, (st.add(np.concatenate(index)), st.add(np.concatenate(values)))))
        return writes

    def record_sampled(self, batch: StepBatch, sampled: SamplerOutput) -> None:
        """Write each sampled token at its position (the next step's decode input) and count it for penalties."""
        rows = batch.sampling
        assert rows is not None
        self.tokens[rows.slots, rows.write_pos] = sampled.token_ids
        self.sampling.record(rows, sampled.token_ids)
