"""EngineCore: schedule -> launch -> (wait) -> update, one step at a time, with no threads and no asyncio.

The async engine drives it from its loop thread; the offline `LLM` drives it directly. Stop strings are found by the
per-choice incremental detokenizer here, and end the sequence through `scheduler.finish`; so does a structured-output
grammar that is complete (engine/structured_output.py). Prompt scores (engine/prompt_logprobs.py) are gathered here
until a choice's first output carries them.

Overlapped scheduling (`overlap_scheduling`, on by default with CUDA): `step()` schedules and launches step N+1
*before* waiting for step N, so the host's scheduling, input staging and kernel launches for N+1 run while the
device computes N; then N's tokens are applied and emitted. The scheduler plans N+1 with a placeholder for each
token N is sampling, and the runner reads those tokens on the device, so the outputs are token for token those of
the synchronous loop, only one step later. Work scheduled for a sequence that N finishes (EOS, a stop string, an
abort) is wasted and its result dropped. No KV block is overwritten while a step that reads it is in flight: the
device runs the steps' kernels in launch order on one stream, so a block freed (and reallocated) by the host
between launching N and N+1 is written by N+1 only after N has finished with it. A grammar-constrained sequence
sits out the step after each of its tokens (its next mask needs that token on the host: Scheduler
`_waits_for_token`), so it decodes every other step while the others keep the overlap. The loop runs
synchronously while a request is suspected of a fault (below).

Fault isolation: a step that raises (at launch, or when its results are collected) must not fail the requests
that did nothing wrong. Its sequences are rolled back to their last applied token (`Scheduler.roll_back`: they
recompute, which gives the same tokens) and their requests become suspects, each of which then runs alone until
it gets a token. A request that fails alone (a suspect, or the only request of its step) fails with
FinishReason.ERROR; the others finish exactly as in a clean run. `unattributed_failure` tells the async
engine's breaker about failures that may be the runner's own rather than a request's.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer

from plm_serve.engine.config import EngineConfig
from plm_serve.engine.detokenizer import IncrementalDetokenizer, TokenTexts
from plm_serve.engine.model_runner import ModelRunner, to_token_logprob
from plm_serve.engine.prompt_logprobs import PromptLogprobsCollector
from plm_serve.engine.request import EngineRequest, FinishReason, StepOutput
from plm_serve.engine.runner_output import PendingStep, RunnerOutput
from plm_serve.engine.scheduler import Scheduler
from plm_serve.engine.scheduler_output import GrammarBitmask, SchedulerOutput
from plm_serve.engine.sequence import Sequence, SequenceStatus
from plm_serve.engine.structured_output import GrammarCompiler, advance_grammars, grammar_bitmask
from plm_serve.engine.validation import ModelLimits, validate_request
from plm_serve.models import PLMConfig, load_model

logger = logging.getLogger(__name__)

# On CPU there is no memory profile to size the KV pool from: 4096 blocks of 16 tokens = 64k tokens,
# unless `num_kv_blocks` says otherwise.
CPU_DEFAULT_KV_BLOCKS = 4096


@dataclass(frozen=True, slots=True)
class EngineStats:
    """A snapshot of the engine's gauges and counters. The engine thread publishes a new one after every change
    (one reference assignment), so other threads read a consistent object and never the live scheduler."""

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
        runner.capture_graphs()
        self.scheduler = Scheduler(
            config.replace(max_model_len=self.max_model_len), num_blocks, set(self.eos_token_ids)
        )
        self.scheduler.encode_ahead = runner.encodes_async
        self.scheduler.media_ready = runner.media_ready
        self.detokenizers: dict[int, IncrementalDetokenizer] = {}
        self.token_texts = TokenTexts(
            tokenizer
        )  # logprob token texts, memoized (a long prompt repeats tokens)
        # Structured outputs and prompt scoring (engine/structured_output.py, engine/prompt_logprobs.py).
        self.grammars = GrammarCompiler(tokenizer, model_config.text.vocab_size, self.eos_token_ids)
        self._constrained: dict[int, Sequence] = {}  # seq id -> unfinished sequence with a grammar
        self.prompt_logprobs = PromptLogprobsCollector()
        self.model_config = model_config
        self.limits = ModelLimits(
            vocab_size=model_config.text.vocab_size,
            placeholder_ids={"image": model_config.image_token_id, "video": model_config.video_token_id},
            tokens_per_tile=model_config.tokens_per_tile,
            max_waiting=config.max_waiting_requests,
        )
        # Set by a step whose failure cannot be pinned on a request (see `_recover`); read by the breaker.
        self.unattributed_failure: Exception | None = None
        self._runner_ok_since_fault = True  # a step succeeded since the last rolled-back failure
        self._counters = EngineStats(num_kv_blocks=num_blocks)  # cumulative counters, engine thread only
        self.stats = self._counters
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
        """Queue `request`; RequestRejectedError if it can never run or a value could not enter a batch."""
        validate_request(request, self.limits)
        structured = request.sampling.structured_output
        # A cache hit when the server compiled it (off this thread) before submitting; StructuredOutputError.
        grammar = self.grammars.compile(structured) if structured is not None else None
        seqs = self.scheduler.add_request(request)
        if grammar is not None:
            for seq in seqs:
                seq.grammar = grammar.matcher()
                self._constrained[seq.seq_id] = seq
        self._refresh_gauges()

    def abort_request(self, request_id: str) -> list[StepOutput]:
        """Drop a request everywhere; returns a final ABORT output per unfinished choice (empty if unknown)."""
        outs = []
        for seq in self.scheduler.abort_request(request_id):
            self.detokenizers.pop(seq.seq_id, None)
            self.prompt_logprobs.drop(seq.seq_id)
            outs.append(self._output(seq, "", [], FinishReason.ABORT))
        self._refresh_gauges()
        return outs

    def fail_request(self, request_id: str, exc: BaseException) -> list[StepOutput]:
        """End every unfinished choice of a request with FinishReason.ERROR (and free what it holds)."""
        outputs = self.abort_request(request_id)
        for out in outputs:
            out.finish_reason = FinishReason.ERROR
            out.error = f"{type(exc).__name__}: {exc}"
        return outputs

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished() or bool(self._in_flight)

    # ------------------------------------------------------------------------------------------- step
    def step(self) -> list[StepOutput]:
        """Schedule and launch the next step; apply the oldest step in flight (synchronous loop: this one;
        overlapped: the previous one, once this one is launched). Returns the outputs applied."""
        t0 = time.perf_counter()
        self.unattributed_failure = None
        overlap = self._overlaps()
        launched: SchedulerOutput | None = None
        try:
            if overlap or not self._in_flight:  # synchronous: nothing is planned while a step is in flight
                sched = self.scheduler.schedule()
                if sched.has_work:
                    launched = sched  # from here on, a failure rolls it back
                    sched.grammar = self._grammar_bitmask(sched)
                    self._in_flight.append((sched, self.runner.launch(sched)))
            if not self._in_flight:
                if self.scheduler.has_unfinished():  # maybe all that is left waits for an image's encoding
                    self.runner.wait_for_media()
                return []
            if launched is not None and overlap and len(self._in_flight) == 1:
                return []  # the first step of a run: its results are collected after the next launch
            done, pending = self._in_flight[0]
            result = pending.wait()
            self._in_flight.popleft()
        except Exception as exc:  # a failing step must not take the loop, nor anyone innocent, down
            return self._recover(launched, exc)
        self._runner_ok_since_fault = True
        return self._apply(done, result, t0)

    def _overlaps(self) -> bool:
        """Whether the next step may be launched before the previous one's tokens are back."""
        return self.overlap and not self.scheduler.has_suspects

    def _grammar_bitmask(self, sched: SchedulerOutput) -> GrammarBitmask | None:
        """The allowed tokens of the step's grammar-constrained sampling rows (None when it has none). Each
        such row's previous token has been applied: the scheduler runs it only then."""
        if not self._constrained:
            return None
        live = self.scheduler.sequence  # forget the finished ones
        self._constrained = {i: s for i, s in self._constrained.items() if live(i) is not None}
        constrained = [
            self._constrained[c.seq_id] for c in sched.chunks if c.sample and c.seq_id in self._constrained
        ]
        return grammar_bitmask(constrained, self.limits.vocab_size, pin=self.runner.device.type == "cuda")

    def _apply(self, done: SchedulerOutput, result: RunnerOutput, t0: float) -> list[StepOutput]:
        """Apply a finished step's tokens and emit one output per sequence that got one."""
        got = self.scheduler.update(done, result.sampled)
        self.prompt_logprobs.add(result.prompt_logprobs)
        for seq in advance_grammars(
            [(s, result.sampled[s.seq_id]) for s in got]
        ):  # a complete grammar ends it
            self.scheduler.finish(seq, FinishReason.STOP)
        outputs: list[StepOutput] = []
        failed: set[str] = set()
        for seq in got:
            if seq.request_id in failed:
                continue
            try:
                outputs.append(self._emit(seq, result))
            except Exception as exc:  # detokenizing one sequence must not cost the others their outputs
                logger.exception("emitting the output of request %s failed", seq.request_id)
                failed.add(seq.request_id)
                self.detokenizers.pop(seq.seq_id, None)
                if (
                    seq.status is SequenceStatus.FINISHED
                ):  # finished by update(): abort has no output left for it
                    out = self._output(seq, "", [], FinishReason.ERROR)
                    out.error = f"{type(exc).__name__}: {exc}"
                    outputs.append(out)
                outputs += self.fail_request(seq.request_id, exc)
        self._update_stats(done, result.num_encoded_tiles, time.perf_counter() - t0)
        return outputs

    def _recover(self, launched: SchedulerOutput | None, exc: Exception) -> list[StepOutput]:
        """A step raised: roll back every step in flight, fail the request to blame, suspect the others.

        The request to blame is the one that ran alone (a suspect) or the only request the lost steps touched
        (their chunks and the media they encoded). A failure is unattributed (it may be the runner's, not a
        request's) when it is a lone request's first, when it fails a suspect before any step has succeeded
        since the roll-back that made it one, or when the lost steps touched no request at all."""
        lost = [s for s, _ in self._in_flight]
        if launched is not None and not any(s is launched for s in lost):  # its launch raised
            lost.append(launched)
        self._in_flight.clear()
        self.runner.discard_staged()
        seq_ids = [c.seq_id for s in lost for c in s.chunks]
        encoded = [m.content_hash for s in lost for m in s.encoder_inputs]
        # Also for the request to blame: blocks and encodings the lost steps wrote are void.
        touched = self.scheduler.roll_back(seq_ids, encoded)
        isolated = [s.isolated for s in lost if s.isolated is not None]
        blamed = isolated or (touched if len(touched) == 1 else [])
        logger.exception(
            "engine step failed (%d requests); %s", len(touched),
            f"failing {blamed}" if blamed else "rolled back: each request runs alone until it gets a token",
        )  # fmt: skip
        if not touched or (blamed and (not isolated or not self._runner_ok_since_fault)):
            self.unattributed_failure = exc
        if not blamed:
            self._runner_ok_since_fault = False
        outputs = [out for request_id in blamed for out in self.fail_request(request_id, exc)]
        self._refresh_gauges()
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

    def _refresh_gauges(self) -> None:
        """Publish a new `stats` snapshot from the scheduler's gauges and the cumulative counters."""
        bm, ec = self.scheduler.block_manager, self.scheduler.encoder_cache
        self.stats = dataclasses.replace(
            self._counters,
            num_running=self.scheduler.num_running,
            num_waiting=self.scheduler.num_waiting,
            kv_usage=bm.usage,
            prefix_cache_queries=bm.queries,
            prefix_cache_hits=bm.hits,
            encoder_cache_queries=ec.queries,
            encoder_cache_hits=ec.hits,
        )

    def _update_stats(self, sched: SchedulerOutput, num_tiles: int, seconds: float) -> None:
        c = self._counters
        self._counters = dataclasses.replace(
            c,
            num_encoded_tiles=c.num_encoded_tiles + num_tiles,
            num_preemptions=c.num_preemptions + len(sched.preempted),
            num_steps=c.num_steps + 1,
            last_step_seconds=seconds,
        )
        self._refresh_gauges()
