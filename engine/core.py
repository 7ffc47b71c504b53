"""EngineCore: schedule -> launch -> (wait) -> update, one step at a time, with no threads and no asyncio.

The async engine drives it from its loop thread; the offline `LLM` drives it directly. Stop strings are found by the
per-choice incremental detokenizer here, and end the sequence through `scheduler.finish`.

Overlapped scheduling (`overlap_scheduling`, on by default with CUDA): `step()` schedules and launches step N+1
*before* waiting for step N, so the host's scheduling, input staging and kernel launches for N+1 run while the
device computes N; then N's tokens are applied and emitted. The scheduler plans N+1 with a placeholder for each
token N is sampling, and the runner reads those tokens on the device, so the outputs are token for token those of
the synchronous loop, only one step later. Work scheduled for a sequence that N finishes (EOS, a stop string, an
abort) is wasted and its result dropped. No KV block is overwritten while a step that reads it is in flight: the
device runs the steps' kernels in launch order on one stream, so a block freed (and reallocated) by the host
between launching N and N+1 is written by N+1 only after N has finished with it.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer

from plm_serve.engine.config import EngineConfig
from plm_serve.engine.detokenizer import IncrementalDetokenizer
from plm_serve.engine.model_runner import ModelRunner, to_token_logprob
from plm_serve.engine.request import EngineRequest, FinishReason, StepOutput
from plm_serve.engine.runner_output import PendingStep, RunnerOutput
from plm_serve.engine.scheduler import Scheduler
from plm_serve.engine.scheduler_output import SchedulerOutput
from plm_serve.engine.sequence import Sequence
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
        self.max_model_len = min(
            config.max_model_len or model_config.max_model_len, model_config.max_model_len
        )
        self.eos_token_ids = tuple(model_config.eos_token_ids)
        num_blocks = config.num_kv_blocks
        if num_blocks is None:
            on_gpu = runner.device.type == "cuda"
            num_blocks = runner.profile_num_blocks() if on_gpu else CPU_DEFAULT_KV_BLOCKS
        runner.allocate_kv_cache(num_blocks)
        runner.capture_graphs()
        self.scheduler = Scheduler(
            config.replace(max_model_len=self.max_model_len), num_blocks, set(self.eos_token_ids)
        )
        self.scheduler.encode_ahead = runner.encodes_async
        self.scheduler.media_ready = runner.media_ready
        self.detokenizers: dict[int, IncrementalDetokenizer] = {}
        self.stats = EngineStats(num_kv_blocks=num_blocks)
        overlap = config.overlap_scheduling
        self.overlap = runner.device.type == "cuda" if overlap is None else overlap
        self._in_flight: deque[tuple[SchedulerOutput, PendingStep]] = deque()  # launched, not yet applied

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
        self.scheduler.add_request(request)  # raises RequestRejectedError for requests that can never run
        self._refresh_gauges()

    def abort_request(self, request_id: str) -> list[StepOutput]:
        """Drop a request everywhere; returns a final ABORT output per unfinished choice (empty if unknown)."""
        outs = []
        for seq in self.scheduler.abort_request(request_id):
            self.detokenizers.pop(seq.seq_id, None)
            outs.append(self._output(seq, "", [], FinishReason.ABORT))
        self._refresh_gauges()
        return outs

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished() or bool(self._in_flight)

    # ------------------------------------------------------------------------------------------- step
    def step(self) -> list[StepOutput]:
        """Schedule and launch the next step; apply the oldest step in flight (synchronous loop: this one;
        overlapped: the previous one, once this one is launched). Returns the outputs applied."""
        t0 = time.perf_counter()
        sched = self.scheduler.schedule()
        launched = sched.has_work
        try:
            if launched:
                self._in_flight.append((sched, self.runner.launch(sched)))
            depth = 1 if self.overlap else 0
            if not self._in_flight:
                if self.scheduler.has_unfinished():  # maybe all that is left waits for an image's encoding
                    self.runner.wait_for_media()
                return []
            if launched and len(self._in_flight) <= depth:
                return []
            done, pending = self._in_flight[0]
            result = pending.wait()
            self._in_flight.popleft()
        except Exception as exc:  # a failing step must not take the loop down
            logger.exception("engine step failed; failing the requests of the steps in flight")
            failed = [s for s, _ in self._in_flight]
            if launched and not any(s is sched for s in failed):  # its launch raised
                failed.append(sched)
            self._in_flight.clear()
            return self._fail_step(failed, exc)
        outputs = [self._emit(seq, result) for seq in self.scheduler.update(done, result.sampled)]
        self._update_stats(done, result.num_encoded_tiles, time.perf_counter() - t0)
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
            logprobs = [to_token_logprob(self._token_text, token, result.logprobs[seq.seq_id])]
        out = self._output(seq, text, [token], seq.finish_reason)
        out.logprobs = logprobs
        if seq.num_output_tokens == 1 and seq.first_scheduled_time is not None:
            out.queue_time_s = max(0.0, seq.first_scheduled_time - seq.arrival_time)
        return out

    def _token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

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

    def _fail_step(self, steps: list[SchedulerOutput], exc: Exception) -> list[StepOutput]:
        outputs = []
        seqs = (self.scheduler.sequence(c.seq_id) for sched in steps for c in sched.chunks)
        for request_id in dict.fromkeys(seq.request_id for seq in seqs if seq is not None):
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
