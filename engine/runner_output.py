"""What a step gives back to the engine, and the handle of a step whose results are still on their way.

`ModelRunner.launch()` enqueues a whole step on the device and returns a `PendingStep` at once: the sampled
token ids (and logprobs when a row asked) are being copied into pinned host memory behind an event. `wait()`
is the step's only host sync; the overlapped loop calls it only after launching the next step.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from plm_serve.engine.prompt_logprobs import PromptTokenLogprob
from plm_serve.engine.sampler import RowLogprobs, SamplerOutput, logprobs_to_host


@dataclass
class RunnerOutput:
    sampled: dict[int, int] = field(default_factory=dict)  # seq_id -> next token id
    logprobs: dict[int, RowLogprobs] = field(default_factory=dict)  # seq_id -> (logprob, [(id, logprob)])
    num_encoded_tiles: int = 0
    prompt_logprobs: dict[int, list[PromptTokenLogprob]] = field(default_factory=dict)  # seq_id -> scores


class PendingStep:
    """Device -> host copies of one step's sampler output, started at launch; `wait()` collects them."""

    def __init__(
        self,
        seq_ids: list[int],
        logprob_counts: list[int | None],
        out: SamplerOutput | None,
        num_encoded_tiles: int,
        prompt_logprobs: dict[int, list[PromptTokenLogprob]] | None = None,
    ) -> None:
        self.seq_ids, self.logprob_counts, self.num_encoded_tiles = seq_ids, logprob_counts, num_encoded_tiles
        self.prompt_logprobs = prompt_logprobs or {}  # already on the host (scoring reads them back at once)
        self._event: torch.cuda.Event | None = None
        self._host: list[torch.Tensor | None] = []
        if out is None:
            return
        tensors = [out.token_ids, out.logprob, out.top_ids, out.top_values]
        cuda = out.token_ids.device.type == "cuda"
        for t in tensors:
            if t is None or not cuda:
                self._host.append(t)
                continue
            host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            host.copy_(t, non_blocking=True)
            self._host.append(host)
        if cuda:
            self._event = torch.cuda.Event()
            self._event.record()

    @classmethod
    def done(
        cls, num_encoded_tiles: int = 0, prompt_logprobs: dict[int, list[PromptTokenLogprob]] | None = None
    ) -> PendingStep:
        """A step that sampled nothing (only media, or prefill chunks that do not sample)."""
        return cls([], [], None, num_encoded_tiles, prompt_logprobs)

    def wait(self) -> RunnerOutput:
        if self._event is not None:
            self._event.synchronize()
        if not self._host:
            return RunnerOutput(
                num_encoded_tiles=self.num_encoded_tiles, prompt_logprobs=self.prompt_logprobs
            )
        token_ids, logprob, top_ids, top_values = self._host
        assert token_ids is not None  # the other three exist only when a row asked for logprobs
        host = lambda t: None if t is None else t.tolist()
        sampled = dict(zip(self.seq_ids, token_ids.tolist(), strict=True))
        logprob, top_ids, top_values = host(logprob), host(top_ids), host(top_values)
        logprobs = {}
        if logprob is not None:
            rows = logprobs_to_host(self.logprob_counts, logprob, top_ids, top_values)
            logprobs = {s: lp for s, lp in zip(self.seq_ids, rows, strict=True) if lp is not None}
        return RunnerOutput(sampled, logprobs, self.num_encoded_tiles, self.prompt_logprobs)
