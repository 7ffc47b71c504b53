"""`LLM(model=PATH).chat(conversations, params)`: batch jobs on the same engine the server uses.

Every prompt is added to one `EngineCore` up front, then the core steps until all are done, so a batch gets the
same continuous batching, prefix caching and encoder cache as online traffic.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from plm_serve.engine import (
    EngineConfig,
    EngineCore,
    EngineRequest,
    MMInput,
    SamplingParams,
    StepOutput,
    TokenLogprob,
)
from plm_serve.processors import ImageInput, ProcessedPrompt, Processor, VideoInput


@dataclass
class CompletionOutput:
    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    logprobs: list[TokenLogprob] | None = None


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    num_cached_tokens: int = 0


class LLM:
    """Offline engine. `engine_args` are `EngineConfig` fields (max_num_seqs, num_kv_blocks, dtype, device, ...)."""

    def __init__(self, model: str | Path, **engine_args: Any) -> None:
        self.core = EngineCore.load(EngineConfig(model=str(model), **engine_args))
        self.processor = Processor.from_pretrained(model)
        self._ids = itertools.count()

    def chat(
        self, conversations: list[dict] | list[list[dict]], sampling_params: SamplingParams | None = None
    ) -> list[RequestOutput]:
        """One conversation (a list of messages) or a list of them. Media parts: `{"type": "image", "image":
        bytes | path}`, `{"type": "video", "video": bytes | path}`, or `ImageInput` / `VideoInput` objects."""
        batch = cast(
            "list[list[dict]]",
            [conversations] if conversations and isinstance(conversations[0], dict) else conversations,
        )
        limit = self.core.max_model_len - ((sampling_params or SamplingParams()).max_tokens or 1)
        prompts = [
            self.processor.process_chat(_media_to_inputs(conv), max_prompt_tokens=limit) for conv in batch
        ]
        return self._run(prompts, sampling_params or SamplingParams())

    def generate(
        self, prompts: str | list[str] | list[list[int]], sampling_params: SamplingParams | None = None
    ) -> list[RequestOutput]:
        """Plain-text prompts (BOS added like the tokenizer does) or lists of token ids, no chat template."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        processed = [
            ProcessedPrompt(token_ids=list(p), media=[])
            if isinstance(p, list)
            else self.processor.process_prompt(p)
            for p in prompts
        ]
        return self._run(processed, sampling_params or SamplingParams())

    def _run(self, prompts: list[ProcessedPrompt], params: SamplingParams) -> list[RequestOutput]:
        """Add every prompt, step until all are done. If one fails (or is rejected, or the caller interrupts),
        the rest of the batch is aborted before the error propagates, so the engine is empty and the next call
        starts clean."""
        results: dict[str, RequestOutput] = {}
        try:
            for prompt in prompts:
                request_id = f"offline-{next(self._ids)}"
                media = [MMInput(m.content_hash, m.pixels, m.offset, m.length, m.kind) for m in prompt.media]
                outputs = [CompletionOutput(index=i) for i in range(params.n)]
                results[request_id] = RequestOutput(request_id, prompt.token_ids, outputs)
                self.core.add_request(EngineRequest(request_id, prompt.token_ids, params, media))
            while self.core.has_unfinished():
                for out in self.core.step():
                    _accumulate(results[out.request_id], out)
        finally:
            for request_id in results:
                self.core.abort_request(request_id)  # a no-op for finished requests
        return list(results.values())


def _accumulate(result: RequestOutput, out: StepOutput) -> None:
    choice = result.outputs[out.index]
    choice.text += out.text
    choice.token_ids.extend(out.token_ids)
    result.num_cached_tokens = max(result.num_cached_tokens, out.num_cached_tokens)
    if out.logprobs is not None:
        choice.logprobs = (choice.logprobs or []) + out.logprobs
    if out.finish_reason is not None:
        choice.finish_reason = out.finish_reason.value
        if out.error:
            raise RuntimeError(f"request {result.request_id} failed: {out.error}")


def _media_to_inputs(messages: list[dict]) -> list[dict]:
    converted = []
    for message in messages:
        content = message.get("content")
        if isinstance(content, list):
            content = [_part(p) for p in content]
        converted.append({**message, "content": content})
    return converted


def _part(part: Any) -> Any:
    if isinstance(part, dict) and part.get("type") == "image":
        return ImageInput(data=_read(part["image"]), detail=part.get("detail", "auto"))
    if isinstance(part, dict) and part.get("type") == "video":
        return VideoInput(data=_read(part["video"]), num_frames=part.get("num_frames"), fps=part.get("fps"))
    return part


def _read(source: bytes | str | Path) -> bytes:
    return source if isinstance(source, bytes) else Path(source).read_bytes()
