"""The only part of the engine that touches the device: KV pool, vision encoding, decoder forward, sampling.

One `execute(scheduler_output)` call per engine step:
1. encode the step's new images/videos (batched vision-tower forwards under the encoder budget) and keep their
   embeddings by content hash until the scheduler reports them freed;
2. flatten every scheduled chunk into one varlen batch: token embeddings, with placeholder rows replaced by the
   matching rows of the cached media embeddings (a chunk may cover part of an image);
3. one decoder forward through the paged-attention backend; logits only for rows that sample;
4. sample the next token of every sequence whose known tokens are now all computed.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass, field

import torch

from plm_serve.engine.attention import AttentionMetadata, KVCache, make_attention
from plm_serve.engine.config import EngineConfig
from plm_serve.engine.prompt_logprobs import PromptTokenLogprob, compute_prompt_logprobs
from plm_serve.engine.request import MMInput, TokenLogprob
from plm_serve.engine.sampler import Sampler, SamplingBatch
from plm_serve.engine.scheduler import ScheduledChunk, SchedulerOutput
from plm_serve.engine.structured_output import apply_grammar_bitmask
from plm_serve.models import PerceptionLM

logger = logging.getLogger(__name__)


@dataclass
class RunnerOutput:
    sampled: dict[int, int]  # seq_id -> next token id
    logprobs: dict[
        int, tuple[float, list[tuple[int, float]]]
    ]  # seq_id -> (logprob, [(id, logprob)] best first)
    num_encoded_tiles: int = 0
    prompt_logprobs: dict[int, list[PromptTokenLogprob]] = field(default_factory=dict)  # seq_id -> scores


class ModelRunner:
    def __init__(
        self, model: PerceptionLM, config: EngineConfig, device: torch.device, dtype: torch.dtype
    ) -> None:
        self.model = model
        self.eos_token_ids = tuple(model.config.eos_token_ids)  # masked while a sequence is under min_tokens
        self.config = config
        self.device = device
        self.dtype = dtype
        text = model.config.text
        self.num_layers = text.num_hidden_layers
        self.num_kv_heads = text.num_key_value_heads
        self.head_dim = text.head_dim
        self.vocab_size = text.vocab_size
        self.block_size = config.block_size
        self.sampler = Sampler()
        self.media_embeds: dict[str, torch.Tensor] = {}  # content hash -> [length, hidden] embedding rows
        self.kv_cache: KVCache | None = None

    # ----------------------------------------------------------------------------------------------- KV pool
    def block_bytes(self) -> int:
        return KVCache.bytes_per_block(
            self.num_layers, self.block_size, self.num_kv_heads, self.head_dim, self.dtype
        )

    def allocate_kv_cache(self, num_blocks: int) -> None:
        self.kv_cache = KVCache.allocate(
            self.num_layers,
            num_blocks,
            self.block_size,
            self.num_kv_heads,
            self.head_dim,
            self.dtype,
            self.device,
        )
        logger.info(
            "KV cache: %d blocks of %d tokens (%.2f GiB)",
            num_blocks,
            self.block_size,
            num_blocks * self.block_bytes() / 2**30,
        )

    @torch.inference_mode()
    def profile_num_blocks(self) -> int:
        """Blocks that fit in `gpu_memory_utilization` of the device after a worst-case step.

        The warm-up runs the largest vision batch (the encoder budget in tiles) and a full token budget through the
        decoder, so the activation peak is measured, not guessed.
        """
        assert self.device.type == "cuda", "profiling needs a CUDA device; set num_kv_blocks on CPU"
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        tiles = torch.zeros((self.config.max_encoder_tiles_per_step, 3, 448, 448), dtype=torch.uint8)
        self.encode_tiles(tiles.to(self.device))
        num_tokens = min(self.config.max_num_batched_tokens, self.model.config.max_model_len)
        ids = torch.zeros(num_tokens, dtype=torch.long, device=self.device)
        hidden = self.model(
            self.model.embed_tokens(ids),
            torch.arange(num_tokens, device=self.device),
            _NoCacheAttention(num_tokens),
        )
        self.model.compute_logits(hidden[-self.config.max_num_seqs :])
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device)
        free, total = torch.cuda.mem_get_info(self.device)
        used_by_others = total - free - torch.cuda.memory_reserved(self.device)
        budget = total * self.config.gpu_memory_utilization - used_by_others - peak
        num_blocks = int(budget // self.block_bytes())
        if num_blocks <= 0:
            raise RuntimeError(
                f"no memory left for the KV cache (peak {peak / 2**30:.1f} GiB of {total / 2**30:.1f} GiB); "
                "raise --gpu-memory-utilization or lower --max-num-batched-tokens"
            )
        torch.cuda.empty_cache()
        return num_blocks

    # ----------------------------------------------------------------------------------------------- vision
    def encode_tiles(self, pixels_u8: torch.Tensor) -> torch.Tensor:
        """uint8 [N, 3, 448, 448] on the device -> [N, tokens_per_tile, hidden], in encoder-budget batches."""
        step = max(1, self.config.max_encoder_tiles_per_step)
        outs = [
            self.model.encode_media(self.model.normalize_pixels(pixels_u8[i : i + step]))
            for i in range(0, pixels_u8.shape[0], step)
        ]
        return torch.cat(outs)

    def _encode_media(self, items: list[MMInput]) -> int:
        todo = [m for m in items if m.content_hash not in self.media_embeds]
        if not todo:
            return 0
        pixels = torch.cat([m.pixels for m in todo]).to(self.device, non_blocking=True)
        feats = self.encode_tiles(pixels)  # [sum T, tokens_per_tile, H]
        start = 0
        for m in todo:
            self.media_embeds[m.content_hash] = feats[start : start + m.num_tiles].flatten(0, 1)
            start += m.num_tiles
        return start

    def free_media(self, hashes: list[str]) -> None:
        for h in hashes:
            self.media_embeds.pop(h, None)

    # ----------------------------------------------------------------------------------------------- step
    @torch.inference_mode()
    def execute(self, out: SchedulerOutput) -> RunnerOutput:
        self.free_media(out.freed_encoder_hashes)
        num_tiles = self._encode_media(out.encoder_inputs)
        if not out.chunks:
            return RunnerOutput({}, {}, num_tiles)
        batch = self._prepare(out.chunks)
        attention = make_attention(self.kv_cache, batch.metadata)
        hidden = self.model(batch.embeds, batch.positions, attention)
        prompt_logprobs = compute_prompt_logprobs(self.model, hidden, out.chunks)  # only rows that ask
        sample_chunks = [c for c in out.chunks if c.sample]
        if not sample_chunks:
            return RunnerOutput({}, {}, num_tiles, prompt_logprobs)
        logits = self.model.compute_logits(hidden[batch.sample_rows])  # [S, V] float32
        seqs = [c.seq for c in sample_chunks]
        apply_grammar_bitmask(logits, seqs)  # structured outputs: -inf where a row's grammar forbids
        sampling = SamplingBatch.from_sequences(seqs, self.vocab_size, self.device, self.eos_token_ids)
        result = self.sampler(logits, sampling, consume=True)  # this step's own logits: no [B, V] copy needed
        sampled = {s.seq_id: int(t) for s, t in zip(seqs, result.token_ids, strict=True)}
        logprobs = {}
        if result.logprobs is not None:
            for s, lp in zip(seqs, result.logprobs, strict=True):
                if lp is not None:
                    logprobs[s.seq_id] = lp
        return RunnerOutput(sampled, logprobs, num_tiles, prompt_logprobs)

    def _prepare(self, chunks: list[ScheduledChunk]) -> _Batch:
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        media_rows: list[int] = []
        media_parts: list[torch.Tensor] = []
        sample_rows: list[int] = []
        tables: list[list[int]] = []
        for c in chunks:
            seq, start, end = c.seq, c.start, c.start + c.num_tokens
            row0 = len(ids)
            ids.extend(seq.token_ids[start:end])
            positions.extend(range(start, end))
            table = seq.block_table
            bs = self.block_size
            slots.extend(table[p // bs] * bs + p % bs for p in range(start, end))
            for item, chunk_pos, row, num_rows in c.media_slices():
                media_rows.extend(range(row0 + chunk_pos, row0 + chunk_pos + num_rows))
                media_parts.append(self.media_embeds[item.content_hash][row : row + num_rows])
            if c.sample:
                sample_rows.append(len(ids) - 1)
            tables.append(table)
        dev = self.device
        ids_t = torch.tensor(ids, dtype=torch.long, device=dev)
        embeds = self.model.embed_tokens(ids_t)
        if media_rows:
            embeds[torch.tensor(media_rows, device=dev)] = torch.cat(media_parts).to(embeds.dtype)
        max_blocks = max(len(t) for t in tables)
        block_tables = torch.tensor(
            [t + [0] * (max_blocks - len(t)) for t in tables], dtype=torch.int32, device=dev
        )
        context = [c.start + c.num_tokens for c in chunks]
        metadata = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.long, device=dev),
            block_tables=block_tables,
            context_lens=torch.tensor(context, dtype=torch.long, device=dev),
            query_lens=[c.num_tokens for c in chunks],
            context_lens_host=context,
            query_start=torch.tensor(
                [0, *itertools.accumulate(c.num_tokens for c in chunks)], dtype=torch.int32, device=dev
            ),
            max_query_len=max(c.num_tokens for c in chunks),
        )
        return _Batch(
            embeds=embeds,
            positions=torch.tensor(positions, dtype=torch.long, device=dev),
            metadata=metadata,
            sample_rows=torch.tensor(sample_rows, dtype=torch.long, device=dev),
        )


@dataclass
class _Batch:
    embeds: torch.Tensor  # [T, hidden]
    positions: torch.Tensor  # [T]
    metadata: AttentionMetadata
    sample_rows: torch.Tensor  # [S] rows whose logits are sampled


class _NoCacheAttention:
    """Memory-profiling stand-in: causal attention over one sequence without touching the KV pool."""

    def __init__(self, num_tokens: int) -> None:
        self.num_tokens = num_tokens

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        from plm_serve.models.attention import causal_sdpa

        return causal_sdpa(q, k, v)


def to_token_logprob(
    tokenizer_decode, token_id: int, entry: tuple[float, list[tuple[int, float]]]
) -> TokenLogprob:
    logprob, top = entry
    return TokenLogprob(
        token_id=token_id,
        token=tokenizer_decode(token_id),
        logprob=logprob,
        top=[(tid, tokenizer_decode(tid), lp) for tid, lp in top],
    )
