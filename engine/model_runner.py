"""The only part of the engine that touches the device: KV pool, vision encoding, decoder forward, sampling.

One `launch(scheduler_output)` per engine step enqueues the whole step and returns without waiting for it:
1. drop the encoder outputs the scheduler freed, and encode the step's new images/videos (in tile-count
   buckets; on CUDA on a stream of their own, so running decodes do not queue behind a 36-tile encode);
2. apply the step's diffs to the device-resident batch state (engine/device_state.py) and build the step's
   input ids, positions and attention metadata there, from one pinned staging copy;
3. one decoder forward: the replay of a captured CUDA graph for a decode-only step that fits a bucket,
   otherwise eagerly through the paged-attention backend, with placeholder rows taking the rows of the cached
   media embeddings; logits only for the rows that sample;
4. mask the logits of grammar-constrained rows (structured outputs, with the bitmask the core attached), sample
   on the device from persistent per-slot parameters, write each token where the next step reads its input, and
   start copying the tokens to the host behind an event (`PendingStep.wait()` collects them).
A step whose chunks score their prompt (prompt logprobs) runs eagerly and reads those scores back at once.
The runner reads only the records of engine/scheduler_output.py, never the scheduler's live sequences.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable

import torch

from plm_serve.engine.attention import AttentionMetadata, KVCache, make_attention, resolve_backend
from plm_serve.engine.config import EngineConfig
from plm_serve.engine.cuda_graphs import CudaGraph, DecodeGraphs, Graph, StaticDecodeInputs, graph_buckets
from plm_serve.engine.device_state import DeviceBatchState, StepBatch
from plm_serve.engine.prompt_logprobs import PromptTokenLogprob, compute_prompt_logprobs
from plm_serve.engine.request import MMInput, TokenLogprob
from plm_serve.engine.runner_output import PendingStep, RunnerOutput
from plm_serve.engine.sampler import Sampler, SamplingRows
from plm_serve.engine.scheduler_output import SchedulerOutput
from plm_serve.engine.structured_output import apply_grammar_bitmask
from plm_serve.models import DenseCausalAttention, PerceptionLM

logger = logging.getLogger(__name__)


def tile_buckets(max_tiles: int) -> list[int]:
    """Vision-tower batch sizes: 1, 2, 4, 8, then multiples of 4, then `max_tiles` (bounded distinct shapes;
    a 36-tile image runs unpadded, a 37-tile one pads 3 tiles)."""
    sizes = [b for b in (1, 2, 4, 8) if b < max_tiles] + list(range(12, max_tiles, 4))
    return [*sizes, max_tiles]


class ModelRunner:
    def __init__(
        self,
        model: PerceptionLM,
        config: EngineConfig,
        device: torch.device,
        dtype: torch.dtype,
        graph_factory: Callable[[], Graph] | None = None,
    ) -> None:
        """`graph_factory`: how decode graphs are made; None = real CUDA graphs on CUDA, none elsewhere."""
        self.model = model
        self.config = config
        self.device = device
        self.dtype = dtype
        text = model.config.text
        self.num_layers = text.num_hidden_layers
        self.num_kv_heads = text.num_key_value_heads
        self.head_dim = text.head_dim
        self.vocab_size = text.vocab_size
        self.block_size = config.block_size
        max_model_len = min(config.max_model_len or model.config.max_model_len, model.config.max_model_len)
        self.state = DeviceBatchState(
            config.max_num_seqs, max_model_len, config.block_size, self.vocab_size, device,
            model.config.eos_token_ids,
        )  # fmt: skip
        self.sampler = Sampler()
        self.kv_cache: KVCache | None = None
        self.attention_backend = "torch"  # resolved from config.attention_backend once the KV pool exists
        cuda = device.type == "cuda"
        if graph_factory is None and cuda:
            graph_factory = CudaGraph
        self.graph_factory = graph_factory if config.enable_cuda_graphs else None
        self.graphs: DecodeGraphs | None = None
        self.graph_reserve = 0  # bytes profiling set aside for the decode graphs' memory pool
        self.graph_memory = 0  # bytes the captured graphs actually took (CUDA)
        self.tile_buckets = tile_buckets(config.max_encoder_tiles_per_step)
        self.media_embeds: dict[str, torch.Tensor] = {}  # content hash -> [length, hidden] embedding rows
        self._media_events: dict[str, torch.cuda.Event] = {}  # content hash -> "its encoding is done"
        self._encoder_stream = torch.cuda.Stream(device) if cuda else None

    # ----------------------------------------------------------------------------------------------- KV pool
    def block_bytes(self) -> int:
        return KVCache.bytes_per_block(
            self.num_layers, self.block_size, self.num_kv_heads, self.head_dim, self.dtype
        )

    def allocate_kv_cache(self, num_blocks: int) -> None:
        """`num_blocks` usable blocks plus one scratch block at the end: a padding row's slot -1 lands there,
        so no backend can corrupt a real block with it."""
        self.kv_cache = KVCache.allocate(
            self.num_layers,
            num_blocks + 1,
            self.block_size,
            self.num_kv_heads,
            self.head_dim,
            self.dtype,
            self.device,
        )
        # Resolved here, not per step: an explicit "triton" that cannot run fails at start-up.
        self.attention_backend = resolve_backend(self.config.attention_backend, self.kv_cache)
        logger.info(
            "KV cache: %d blocks of %d tokens (%.2f GiB)",
            num_blocks,
            self.block_size,
            num_blocks * self.block_bytes() / 2**30,
        )

    @torch.inference_mode()
    def profile_num_blocks(self) -> int:
        """Blocks that fit in `gpu_memory_utilization` of the device after a worst-case step.

        Measured, not guessed: the largest vision batch (the encoder budget in tiles, at its bucket size), a
        full token budget through the decoder, the sampler at its most expensive (every row random with
        min_p, top_p, penalties and 20 logprobs; the penalty tables stay allocated), then the memory the
        decode graphs will keep in their pool: 1.5x the peak of one eager decoder forward at the largest bucket
        (graphs stop at the final norm; the LM head and sampler run outside them, within the peak above).
        """
        assert self.device.type == "cuda", "profiling needs a CUDA device; set num_kv_blocks on CPU"
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        self.state.sampling.ensure_penalty_buffers()
        tiles = torch.zeros((self.config.max_encoder_tiles_per_step, 3, 448, 448), dtype=torch.uint8)
        self.encode_tiles(tiles.to(self.device))
        num_tokens = min(self.config.max_num_batched_tokens, self.model.config.max_model_len)
        logits = self._dense_logits(num_tokens, min(self.config.max_num_seqs, num_tokens))
        self.sampler(logits, self._worst_case_rows(logits.shape[0]), consume=True)
        del logits
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device)
        graph_reserve = 0
        if self.graph_factory is not None:
            torch.cuda.reset_peak_memory_stats(self.device)
            base = torch.cuda.memory_allocated(self.device)
            max_bs = graph_buckets(self.config.max_num_seqs)[-1]
            self._dense_logits(max_bs, 0)
            torch.cuda.synchronize(self.device)
            graph_reserve = int(1.5 * (torch.cuda.max_memory_allocated(self.device) - base))
        self.graph_reserve = graph_reserve
        free, total = torch.cuda.mem_get_info(self.device)
        used_by_others = total - free - torch.cuda.memory_reserved(self.device)
        budget = total * self.config.gpu_memory_utilization - used_by_others - peak - graph_reserve
        num_blocks = int(budget // self.block_bytes()) - 1  # minus the scratch block
        logger.info(
            "memory profile: peak %.2f GiB, decode-graph reserve %.2f GiB, KV budget %.2f GiB",
            peak / 2**30, graph_reserve / 2**30, budget / 2**30,
        )  # fmt: skip
        if num_blocks <= 0:
            raise RuntimeError(
                f"no memory left for the KV cache (peak {peak / 2**30:.1f} GiB of {total / 2**30:.1f} GiB); "
                "raise --gpu-memory-utilization or lower --max-num-batched-tokens"
            )
        torch.cuda.empty_cache()
        return num_blocks

    def _dense_logits(self, num_tokens: int, num_logits: int) -> torch.Tensor:
        """A forward of one `num_tokens`-token sequence without the KV pool; logits of its last `num_logits` rows."""
        ids = torch.zeros(num_tokens, dtype=torch.long, device=self.device)
        positions = torch.arange(num_tokens, device=self.device)
        hidden = self.model(self.model.embed_tokens(ids), positions, DenseCausalAttention([num_tokens]))
        return self.model.compute_logits(hidden[num_tokens - num_logits :])

    def _worst_case_rows(self, n: int) -> SamplingRows:
        dev = self.device
        rows = torch.arange(n, device=dev)
        params = torch.tensor([1.0, 0.9, 0.05, 1.1, 0.1, 0.1], device=dev).expand(n, -1).contiguous()
        table = self.state.sampling
        return SamplingRows(
            slots=rows, write_pos=rows, keys=rows, counters=rows, params=params,
            top_k=torch.zeros(n, dtype=torch.int64, device=dev), greedy=torch.zeros(n, dtype=torch.bool, device=dev),
            all_greedy=False, topk_rows=None, full_rows=rows, max_top_k=0, use_top_p=True, use_min_p=True,
            use_repetition=True, use_frequency=True, bias=None, banned=None, logprobs=[20] * n, max_logprobs=20,
            seen=table.seen[:n] if table.seen is not None else None,
            counts=table.counts[:n].float() if table.counts is not None else None,
        )  # fmt: skip

    # ----------------------------------------------------------------------------------------------- graphs
    def capture_graphs(self) -> None:
        """Capture the decode graphs (after the KV pool exists: they bake its address in)."""
        if self.graph_factory is None:
            return
        probe = self._attention(StaticDecodeInputs(1, 1, self.device).metadata(1))
        if self.graph_factory is CudaGraph and not getattr(type(probe), "cuda_graph_safe", False):
            logger.info(
                "decode steps run eagerly: %s cannot be captured in a CUDA graph", type(probe).__name__
            )
            return
        buckets = graph_buckets(self.config.max_num_seqs)
        static = StaticDecodeInputs(buckets[-1], self.state.max_blocks, self.device)
        new_pool = CudaGraph.new_pool if self.graph_factory is CudaGraph else (lambda: None)
        self.graphs = DecodeGraphs(static, self._graph_forward, buckets, self.graph_factory, new_pool)
        cuda = self.device.type == "cuda"
        before = torch.cuda.memory_reserved(self.device) if cuda else 0
        with torch.inference_mode():
            self.graphs.capture()
        if cuda:
            self.graph_memory = torch.cuda.memory_reserved(self.device) - before

    def _graph_forward(self, bs: int) -> torch.Tensor:
        """What a decode graph of bucket `bs` runs: the decoder on the static inputs' first bs rows -> [bs, H]."""
        assert self.graphs is not None, "called by DecodeGraphs.capture"
        s = self.graphs.static
        return self.model(
            self.model.embed_tokens(s.input_ids[:bs]), s.positions[:bs], self._attention(s.metadata(bs))
        )

    # ------------------------------------------------------------------------------------- attention backend
    def _attention(self, metadata: AttentionMetadata):
        """THE place where the step's attention backend is built (per eager step, once per graph bucket)."""
        assert self.kv_cache is not None, "allocate_kv_cache() first"
        return make_attention(self.kv_cache, metadata, backend=self.attention_backend)

    # ----------------------------------------------------------------------------------------------- vision
    @property
    def encodes_async(self) -> bool:
        """Media are encoded on their own stream: a step should not consume them before `media_ready`."""
        return self._encoder_stream is not None

    def media_ready(self, content_hash: str) -> bool:
        """Whether the embeddings of `content_hash` exist and their encoding has finished (never blocks)."""
        if content_hash not in self.media_embeds:
            return False
        event = self._media_events.get(content_hash)
        return event is None or event.query()

    def wait_for_media(self) -> None:
        """Block until the encoder stream is idle (the engine has nothing else to run meanwhile)."""
        if self._encoder_stream is not None:
            self._encoder_stream.synchronize()

    def encode_tiles(self, pixels_u8: torch.Tensor) -> torch.Tensor:
        """uint8 [N, 3, 448, 448] on the device -> [N, tokens_per_tile, hidden], in encoder-budget batches.

        Each batch is padded with blank tiles up to its bucket size (`tile_buckets`), so the vision tower only
        ever sees a few batch shapes (no per-shape kernel selection or graph building); tiles are independent,
        so padding does not change the real tiles' features.
        """
        step = max(1, self.config.max_encoder_tiles_per_step)
        outs = []
        for i in range(0, pixels_u8.shape[0], step):
            batch = pixels_u8[i : i + step]
            n = batch.shape[0]
            size = next(b for b in self.tile_buckets if b >= n)
            if size > n:
                batch = torch.cat([batch, batch.new_zeros((size - n, *batch.shape[1:]))])
            outs.append(self.model.encode_media(self.model.normalize_pixels(batch))[:n])
        return torch.cat(outs)

    def _encode_media(self, items: list[MMInput]) -> int:
        todo = [m for m in items if m.content_hash not in self.media_embeds]
        if not todo:
            return 0
        stream = self._encoder_stream
        total = sum(m.num_tiles for m in todo)
        with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
            pixels = torch.empty((total, *todo[0].pixels.shape[1:]), dtype=torch.uint8, device=self.device)
            start = 0
            for m in todo:  # page-locked host memory, so the copies run without the host waiting
                src = m.pixels.pin_memory() if stream is not None and not m.pixels.is_pinned() else m.pixels
                pixels[start : start + m.num_tiles].copy_(src, non_blocking=True)
                start += m.num_tiles
            feats = self.encode_tiles(pixels)  # [sum T, tokens_per_tile, H]
            event = None
            if stream is not None:
                event = torch.cuda.Event()
                event.record(stream)
                feats.record_stream(torch.cuda.current_stream(self.device))  # read later on the main stream
        start = 0
        for m in todo:
            self.media_embeds[m.content_hash] = feats[start : start + m.num_tiles].flatten(0, 1)
            if event is not None:
                self._media_events[m.content_hash] = event
            start += m.num_tiles
        return start

    def free_media(self, hashes: list[str]) -> None:
        for h in hashes:
            self.media_embeds.pop(h, None)
            self._media_events.pop(h, None)

    # ----------------------------------------------------------------------------------------------- step
    @torch.inference_mode()
    def launch(self, out: SchedulerOutput) -> PendingStep:
        """Enqueue the whole step; the returned handle's `wait()` is its only host sync."""
        self.free_media(out.freed_encoder_hashes)
        num_tiles = self._encode_media(out.encoder_inputs)
        if not out.chunks:
            return PendingStep.done(num_tiles)
        batch = self.state.prepare(out)
        logits, prompt_logprobs = self._forward(
            batch, out
        )  # [S, V] float32: the logits of the rows that sample
        if batch.sampling is None:
            return PendingStep.done(num_tiles, prompt_logprobs)
        assert logits is not None
        if out.grammar is not None:  # logits processors apply here, to the raw logits of the sampled rows
            apply_grammar_bitmask(logits, batch.sample_seq_ids, out.grammar)
        sampled = self.sampler(logits, batch.sampling, consume=True)  # its own logits: no [S, V] copy
        self.state.record_sampled(batch, sampled)
        return PendingStep(batch.sample_seq_ids, batch.sampling.logprobs, sampled, num_tiles, prompt_logprobs)

    def discard_staged(self) -> None:
        """After a failed step: drop what it staged for the next one (its sequences come back as new ones)."""
        self.state.sampling.discard_admissions()

    def execute(self, out: SchedulerOutput) -> RunnerOutput:
        """`launch` and wait (the synchronous loop, tests)."""
        return self.launch(out).wait()

    def _forward(
        self, batch: StepBatch, out: SchedulerOutput
    ) -> tuple[torch.Tensor | None, dict[int, list[PromptTokenLogprob]]]:
        """The logits of the sampled rows (None if none samples) and the prompt scores the chunks ask for."""
        graphs = self.graphs
        bs = graphs.bucket_for(batch.num_rows) if graphs is not None and batch.is_decode_only else None
        if graphs is not None and bs is not None:  # every row samples: the LM head takes the graph's rows
            hidden = graphs.run(batch, self.state.block_table[batch.slots], bs)
            return self.model.compute_logits(hidden), {}
        hidden = self.model(self._embed(batch), batch.positions, self._attention(batch.metadata))
        scores = {}
        if any(c.scoring is not None for c in out.chunks):  # decode rows never score: graphs need not
            scores = compute_prompt_logprobs(self.model, hidden, out.chunks)
        if batch.sampling is None:
            return None, scores
        return self.model.compute_logits(hidden[batch.sample_rows]), scores

    def _embed(self, batch: StepBatch) -> torch.Tensor:
        """Token embeddings [T, H], placeholder rows replaced by the matching rows of cached media embeddings."""
        embeds = self.model.embed_tokens(batch.input_ids)
        if batch.media_rows is None:
            return embeds
        main = torch.cuda.current_stream(self.device) if self._encoder_stream is not None else None
        parts = []
        for m in batch.media:
            event = self._media_events.get(m.content_hash)
            if main is not None and event is not None:
                main.wait_event(event)  # a device-side wait: free if the encoding finished long ago
            parts.append(self.media_embeds[m.content_hash][m.row : m.row + m.num_rows])
        embeds[batch.media_rows] = torch.cat(parts).to(embeds.dtype)
        return embeds


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
