"""Engine `TokenLogprob`s in OpenAI's two formats: chat (`content: [{token, logprob, bytes, top_logprobs}]`)
and legacy completions (parallel `tokens` / `token_logprobs` / `top_logprobs` / `text_offset` lists)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from plm_serve.server.protocol import CompletionLogprobs, PromptLogprob, TokenLogprobOut, TopLogprob

if TYPE_CHECKING:
    from plm_serve.engine import TokenLogprob


def _byte_decoder() -> dict[str, int]:
    """Inverse of byte-level BPE's byte -> printable-character table (Llama-3's tokenizer is byte-level)."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    table = {chr(b): b for b in printable}
    shifted = 0
    for b in range(256):
        if b not in printable:
            table[chr(256 + shifted)] = b
            shifted += 1
    return table


class TokenBytes:
    """Exact UTF-8 bytes of a token, which is what OpenAI's `bytes` field is for: a token that ends inside a
    multi-byte character has text with U+FFFD, but its bytes let a client reassemble the character."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.decoder = _byte_decoder()
        self.cache: dict[int, list[int]] = {}

    def __call__(self, token_id: int, text: str) -> list[int]:
        cached = self.cache.get(token_id)
        if cached is None:
            cached = self.cache[token_id] = self._lookup(token_id, text)
        return cached

    def _lookup(self, token_id: int, text: str) -> list[int]:
        id_to_token = getattr(self.tokenizer, "id_to_token", None)
        piece = id_to_token(token_id) if id_to_token is not None else None
        if piece and all(c in self.decoder for c in piece):
            return [self.decoder[c] for c in piece]
        return list(text.encode("utf-8"))


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
