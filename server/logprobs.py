"""Engine `TokenLogprob`s in OpenAI's two formats: chat (`content: [{token, logprob, bytes, top_logprobs}]`)
and legacy completions (parallel `tokens` / `token_logprobs` / `top_logprobs` / `text_offset` lists)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from plm_serve.server.protocol import CompletionLogprobs, PromptLogprob, TokenLogprobOut, TopLogprob

if TYPE_CHECKING:
    from plm_serve.engine import TokenLogprob
    from plm_serve.processors import TokenBytes


def chat_logprobs(logprobs: list[TokenLogprob], token_bytes: TokenBytes) -> list[TokenLogprobOut]:
    return [
        TokenLogprobOut(
            token=lp.token,
            logprob=lp.logprob,
            bytes=token_bytes(lp.token_id, lp.token),
            top_logprobs=[
                TopLogprob(token=text, logprob=value, bytes=token_bytes(tid, text))
                for tid, text, value in lp.top
            ],
        )
        for lp in logprobs
    ]


def completion_logprobs(logprobs: list[TokenLogprob], text_offset: int) -> CompletionLogprobs:
    """`text_offset` is where the first of these tokens starts in the choice's text."""
    # Every field given explicitly: streamed chunks are dumped with exclude_unset, which would drop
    # default-constructed lists however much they were appended to.
    out = CompletionLogprobs(text_offset=[], token_logprobs=[], tokens=[], top_logprobs=[])
    for lp in logprobs:
        out.text_offset.append(text_offset)
        out.tokens.append(lp.token)
        out.token_logprobs.append(lp.logprob)
        out.top_logprobs.append({text: value for _, text, value in lp.top} if lp.top else None)
        text_offset += len(lp.token)
    return out


def prompt_logprobs_out(scores: list[TokenLogprob | None], k: int) -> list[dict[str, PromptLogprob] | None]:
    """vLLM's `prompt_logprobs`: per prompt token (the first None) {token id: {logprob, rank, decoded_token}},
    the prompt's own token first, then the `k` most likely."""
    out: list[dict[str, PromptLogprob] | None] = []
    for entry in scores:
        if entry is None:
            out.append(None)
            continue
        ranked = {
            str(entry.token_id): PromptLogprob(
                logprob=entry.logprob, rank=entry.rank, decoded_token=entry.token
            )
        }
        for rank, (tid, text, value) in enumerate(entry.top[:k], start=1):
            ranked.setdefault(str(tid), PromptLogprob(logprob=value, rank=rank, decoded_token=text))
        out.append(ranked)
    return out


def echo_logprobs(first_token: str, scores: list[TokenLogprob | None], k: int) -> CompletionLogprobs:
    """The prompt in the legacy completions format (echo): the first token (`first_token` is its text) has no
    logprob (null), as OpenAI and lm-evaluation-harness expect; `k` alternatives per scored token."""
    out = CompletionLogprobs(
        text_offset=[0], token_logprobs=[None], tokens=[first_token], top_logprobs=[None]
    )
    offset = len(first_token)
    for entry in scores[1:]:
        assert entry is not None
        out.text_offset.append(offset)
        out.tokens.append(entry.token)
        out.token_logprobs.append(entry.logprob)
        out.top_logprobs.append({text: value for _, text, value in entry.top[:k]} if k else None)
        offset += len(entry.token)
    return out
