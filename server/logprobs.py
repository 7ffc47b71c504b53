"""Engine `TokenLogprob`s in OpenAI's two formats: chat (`content: [{token, logprob, bytes, top_logprobs}]`)
and legacy completions (parallel `tokens` / `token_logprobs` / `top_logprobs` / `text_offset` lists)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from plm_serve.server.protocol import CompletionLogprobs, TokenLogprobOut, TopLogprob

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
    out = CompletionLogprobs()
    for lp in logprobs:
        out.text_offset.append(text_offset)
        out.tokens.append(lp.token)
        out.token_logprobs.append(lp.logprob)
        out.top_logprobs.append({text: value for _, text, value in lp.top} if lp.top else None)
        text_offset += len(lp.token)
    return out
