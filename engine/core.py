"""EngineCore: schedule -> execute -> update, one step at a time, with no threads and no asyncio.

The async engine drives it from its loop thread; the offline `LLM` drives it directly. Stop strings are found by the
per-choice incremental detokenizer here, and end the sequence through `scheduler.finish`; so does a structured-output
grammar that is complete (engine/structured_output.py). Prompt scores (engine/prompt_logprobs.py) are gathered here
until a choice's first output carries them.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer

from plm_serve.engine.config import EngineConfig
from plm_serve.engine.detokenizer import IncrementalDetokenizer, TokenTexts
from plm_serve.engine.errors import RequestRejectedError
from plm_serve.engine.model_runner import ModelRunner, RunnerOutput, to_token_logprob
from plm_serve.engine.prompt_logprobs import PromptLogprobsCollector
from plm_serve.engine.request import EngineRequest, FinishReason, StepOutput
from plm_serve.engine.scheduler import Scheduler, SchedulerOutput
from plm_serve.engine.sequence import Sequence
from plm_serve.engine.structured_output import GrammarCompiler, advance_grammars
from plm_serve.models import PLMConfig, load_model

logger = logging.getLogger(__name__)

# On CPU there is no memory profile to size the KV pool from: 4096 blocks of 16 tokens = 64k tokens,
# unless `num_kv_blocks` says otherwise.
CPU_DEFAULT_KV_BLOCKS = 4096


@dataclass
class EngineStats:
    num_running: int = 0
    num_waiting: int = 0
    kv_usage: float = 0.0
    num_kv_blocks: int = 0
    prefix_cache_queries: int = 0  # prompt tokens looked up
    prefix_cache_hits: int = 0  # prompt tokens found
    encoder_cache_queries: int = 0  # media items needed by scheduled chunks
    encoder_cache_hits: int = 0  # media items already encoded
    num_encoded_tiles: int = 0  # tiles that went through the vision tower
    num_preemptions: int = 0
    num_steps: int = 0
    last_step_seconds: float = 0.0


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


class EngineCore:
    def __init__(
        self, config: EngineConfig, runner: ModelRunner, tokenizer: Tokenizer, model_config: PLMConfig
    ):
        self.config = config
        self.runner = runner
        self.tokenizer = tokenizer
        model_max = model_config.max_model_len  # the checkpoint's max_position_embeddings
        if config.max_model_len is not None and config.max_model_len > model_max:
            raise ValueError(
                f"max_model_len={config.max_model_len} exceeds the model's maximum of {model_max} positions "
                "(max_position_embeddings in config.json); lower it or leave it unset"
            )
        self.max_model_len = config.max_model_len or model_max
        self.eos_token_ids = tuple(model_config.eos_token_ids)
        num_blocks = config.num_kv_blocks
        if num_blocks is None:
            on_gpu = runner.device.type == "cuda"
            num_blocks = runner.profile_num_blocks() if on_gpu else CPU_DEFAULT_KV_BLOCKS
        runner.allocate_kv_cache(num_blocks)
        self.scheduler = Scheduler(
            config.replace(max_model_len=self.max_model_len), num_blocks, set(self.eos_token_ids)
        )
        self.detokenizers: dict[int, IncrementalDetokenizer] = {}
        self.token_texts = TokenTexts(
            tokenizer
        )  # logprob token texts, memoized (a long prompt repeats tokens)
        self.stats = EngineStats(num_kv_blocks=num_blocks)
        # Structured outputs and prompt scoring (engine/structured_output.py, engine/prompt_logprobs.py).
        self.grammars = GrammarCompiler(tokenizer, model_config.text.vocab_size, self.eos_token_ids)
        self.prompt_logprobs = PromptLogprobsCollector()

    @classmethod
    def load(cls, config: EngineConfig) -> EngineCore:
        path = Path(config.model)
        device = resolve_device(config.device)
        dtype = resolve_dtype(config.dtype, device)
        torch.manual_seed(config.seed)
        model = load_model(path, device=device, dtype=dtype)
        tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
        runner = ModelRunner(model, config, device, dtype)
        logger.info("loaded %s on %s in %s", path, device, dtype)
        return cls(config, runner, tokenizer, model.config)

    # ------------------------------------------------------------------------------------------- requests
    def add_request(self, request: EngineRequest) -> None:
        self._check_media_rows(request)
        structured = request.sampling.structured_output
        # A cache hit when the server compiled it (off this thread) before submitting; StructuredOutputError.
        grammar = self.grammars.compile(structured) if structured is not None else None
        # Raises RequestRejectedError for requests that can never run.
        seqs = self.scheduler.add_request(request)
        if grammar is not None:
            for seq in seqs:
                seq.grammar = grammar.matcher()
        self._refresh_gauges()

    def _check_media_rows(self, request: EngineRequest) -> None:
        """Each media item needs one embedding row per placeholder: tiles x the model's tokens per tile."""
        per_tile = self.runner.model.config.tokens_per_tile
        for i, item in enumerate(request.mm_inputs):
            if item.length != item.num_tiles * per_tile:
                raise RequestRejectedError(
                    f"media item {i} has {item.length} placeholders for {item.num_tiles} tiles, but this model "
                    f"makes {per_tile} embeddings per tile (processor and model configs disagree?)"
                )

    def abort_request(self, request_id: str) -> list[StepOutput]:
        """Drop a request everywhere; returns a final ABORT output per unfinished choice (empty if unknown)."""
        outs = []
        for seq in self.scheduler.abort_request(request_id):
            self.detokenizers.pop(seq.seq_id, None)
            self.prompt_logprobs.drop(seq.seq_id)
            outs.append(self._output(seq, "", [], FinishReason.ABORT))
        self._refresh_gauges()
        return outs

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    # ------------------------------------------------------------------------------------------- step
    def step(self) -> list[StepOutput]:
        t0 = time.perf_counter()
        sched = self.scheduler.schedule()
        if not sched.chunks and not sched.encoder_inputs:
            return []
        try:
            result = self.runner.execute(sched)
        except Exception as exc:  # a failing batch must not take the loop down
            logger.exception("engine step failed; failing the requests of this step")
            return self._fail_step(sched, exc)
        self.scheduler.update(sched, result.sampled)
        self.prompt_logprobs.add(result.prompt_logprobs)
        sampled = [
            (c.seq, result.sampled[c.seq.seq_id]) for c in sched.chunks if c.seq.seq_id in result.sampled
        ]
        for seq in advance_grammars(sampled):  # a grammar that is complete ends its sequence
            self.scheduler.finish(seq, FinishReason.STOP)
        outputs = [self._emit(c.seq, result) for c in sched.chunks if c.seq.seq_id in result.sampled]
        self._update_stats(sched, result.num_encoded_tiles, time.perf_counter() - t0)
        return outputs

    def _emit(self, seq: Sequence, result: RunnerOutput) -> StepOutput:
        token = result.sampled[seq.seq_id]
        detok = self.detokenizers.get(seq.seq_id)
        if detok is None:
            detok = IncrementalDetokenizer(
                self.tokenizer, seq.token_ids[: seq.num_prompt_tokens], seq.sampling.skip_special_tokens,
                seq.sampling.stop,
            )  # fmt: skip
            self.detokenizers[seq.seq_id] = detok
        # The EOS / stop token that ended the sequence is reported in token_ids but never rendered as text.
        text = detok.add([token]) if seq.stop_token_id != token else ""
        if detok.stopped and seq.finish_reason is None:
            self.scheduler.finish(seq, FinishReason.STOP)
        if seq.finish_reason is not None:
            text += detok.flush()
            del self.detokenizers[seq.seq_id]
        logprobs = None
        if seq.sampling.logprobs is not None and seq.seq_id in result.logprobs:
            logprobs = [to_token_logprob(self.token_texts, token, result.logprobs[seq.seq_id])]
        out = self._output(seq, text, [token], seq.finish_reason)
        out.logprobs = logprobs
        if seq.num_output_tokens == 1:
            out.prompt_logprobs = self.prompt_logprobs.take(seq, self.token_texts)
            if seq.first_scheduled_time is not None:
                out.queue_time_s = max(0.0, seq.first_scheduled_time - seq.arrival_time)
        return out

    def _output(self, seq: Sequence, text: str, tokens: list[int], reason: FinishReason | None) -> StepOutput:
        return StepOutput(
            request_id=seq.request_id,
            index=seq.index,
            text=text,
            token_ids=tokens,
            finish_reason=reason,
            num_prompt_tokens=seq.num_prompt_tokens,
            num_cached_tokens=seq.num_cached_tokens,
            num_output_tokens=seq.num_output_tokens,
        )

    def _fail_step(self, sched: SchedulerOutput, exc: Exception) -> list[StepOutput]:
        outputs = []
        for request_id in dict.fromkeys(c.seq.request_id for c in sched.chunks):
            for out in self.abort_request(request_id):
                out.finish_reason = FinishReason.ERROR
                out.error = f"{type(exc).__name__}: {exc}"
                outputs.append(out)
        return outputs

    def _refresh_gauges(self) -> None:
        """Copy the scheduler's gauges and counters into `stats` (read by other threads without locking)."""
        s, bm, ec = self.stats, self.scheduler.block_manager, self.scheduler.encoder_cache
        s.num_running, s.num_waiting = self.scheduler.num_running, self.scheduler.num_waiting
        s.kv_usage = bm.usage
        s.prefix_cache_queries, s.prefix_cache_hits = bm.queries, bm.hits
        s.encoder_cache_queries, s.encoder_cache_hits = ec.queries, ec.hits

    def _update_stats(self, sched: SchedulerOutput, num_tiles: int, seconds: float) -> None:
        s = self.stats
        self._refresh_gauges()
        s.num_encoded_tiles += num_tiles
        s.num_preemptions += len(sched.preempted)
        s.num_steps += 1
        s.last_step_seconds = seconds
