"""Incremental detokenization with stop strings, for byte-level BPE tokenizers (`tokenizers.Tokenizer`).

Public API:
    detok = IncrementalDetokenizer(tokenizer, prompt_token_ids, skip_special_tokens=True, stop=["###"])
    delta = detok.add(new_token_ids)   # new complete text; "" while held back
    detok.stopped                      # a stop string was found: finish the sequence (FinishReason.STOP)
    tail = detok.flush()               # at finish: what was held back (never a matched stop string)
    detok.text                         # everything emitted so far
    TokenTexts(tokenizer)(token_id)    # a single token's text for logprobs (U+FFFD for partial UTF-8)

Two kinds of hold-back:
  * UTF-8: a multi-byte character can be split across tokens; its first tokens decode to U+FFFD. Only
    a window of recent tokens is decoded (prefix/read offsets: `ids[prefix:read]` is text already
    emitted, kept as context; `ids[read:]` is new). While the window's text ends with U+FFFD the new
    tokens are held, or emitted up to the last token boundary that decodes cleanly. After
    `_MAX_PENDING` held tokens the text is emitted as is (the bytes are invalid, not incomplete).
  * Stop strings: text that could be the beginning of a stop string (the longest suffix of the
    pending text that is a prefix of one) is held until it is decided. On a match, the text is cut
    before the stop string and everything after it is dropped.
The tokens that end a sequence (EOS / stop token ids) should not be fed in: their text is never output.
"""

from __future__ import annotations

from collections.abc import Sequence

from tokenizers import Tokenizer

_REPLACEMENT = "\ufffd"
_CONTEXT_TOKENS = 5  # prompt tokens decoded as context in front of the first output token
_MAX_PENDING = 32  # tokens held for incomplete UTF-8 before giving up (invalid bytes)
_MAX_CUTS = 8  # token boundaries tried when looking for a clean cut inside the held tokens


class IncrementalDetokenizer:
    """Turns one sequence's output tokens into text deltas; O(window) work per call."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        prompt_token_ids: Sequence[int],
        skip_special_tokens: bool = True,
        stop: Sequence[str] = (),
    ) -> None:
        self._tokenizer = tokenizer
        self._skip_special = skip_special_tokens
        self._stop = [s for s in stop if s]
        self._max_hold = max((len(s) for s in self._stop), default=1) - 1
        self._ids = list(prompt_token_ids[-_CONTEXT_TOKENS:])
        self._prefix = 0  # ids[prefix:read] were emitted: decoding context
        self._read = len(self._ids)  # ids[read:] are not emitted yet
        self._prefix_text = self._decode(0, self._read)
        self._pending = ""  # decoded text held back for the stop-string check
        self.text = ""
        self.stopped = False

    def add(self, new_token_ids: Sequence[int]) -> str:
        """Feed new output tokens; return the newly emittable text (possibly "")."""
        if self.stopped:
            return ""
        self._ids.extend(new_token_ids)
        return self._emit(self._decode_new(), final=False)

    def flush(self) -> str:
        """At finish: emit everything still held back (incomplete UTF-8 as U+FFFD), minus a stop string."""
        if self.stopped:
            return ""
        delta = ""
        if self._read < len(self._ids):
            delta = self._decode(self._prefix, len(self._ids))[len(self._prefix_text) :]
            self._advance(len(self._ids), delta)
        return self._emit(delta, final=True)

    # ------------------------------------------------------------------------------------------ UTF-8

    def _decode(self, start: int, end: int) -> str:
        return self._tokenizer.decode(self._ids[start:end], skip_special_tokens=self._skip_special)

    def _decode_new(self) -> str:
        """Text of the new tokens up to the last boundary that decodes to complete characters."""
        end = len(self._ids)
        text = self._decode(self._prefix, end)
        if text.endswith(_REPLACEMENT) and end - self._read < _MAX_PENDING:
            for cut in range(end - 1, max(self._read, end - 1 - _MAX_CUTS), -1):
                text = self._decode(self._prefix, cut)
                if not text.endswith(_REPLACEMENT):
                    end = cut
                    break
            else:
                return ""  # the last character is still incomplete
        if len(text) < len(self._prefix_text):  # defensive: a tokenizer whose decode is not additive
            return ""
        delta = text[len(self._prefix_text) :]
        self._advance(end, delta)
        return delta

    def _advance(self, end: int, delta: str) -> None:
        """ids[read:end] are emitted: they become the context window; drop older ids."""
        self._ids = self._ids[self._read :]
        self._read, self._prefix = end - self._read, 0
        self._prefix_text = delta  # byte-level decoding is additive at character boundaries

    # ------------------------------------------------------------------------------------- stop strings

    def _emit(self, delta: str, final: bool) -> str:
        if not self._stop:
            self.text += delta
            return delta
        pending = self._pending + delta
        cut = _first_match(pending, self._stop)
        if cut is not None:
            index, _ = cut
            out, self._pending, self.stopped = pending[:index], "", True
        else:
            hold = 0 if final else _longest_stop_prefix(pending, self._stop, self._max_hold)
            out, self._pending = pending[: len(pending) - hold], pending[len(pending) - hold :]
        self.text += out
        return out


def _first_match(text: str, stops: list[str]) -> tuple[int, str] | None:
    best: tuple[int, str] | None = None
    for stop in stops:
        index = text.find(stop)
        if index >= 0 and (best is None or index < best[0]):
            best = (index, stop)
    return best


def _longest_stop_prefix(text: str, stops: list[str], max_len: int) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of some stop string."""
    for length in range(min(len(text), max_len), 0, -1):
        suffix = text[-length:]
        if any(stop.startswith(suffix) for stop in stops):
            return length
    return 0


class TokenTexts:
    """Text of single tokens for logprobs (a partial UTF-8 byte renders as U+FFFD), memoized."""

    def __init__(self, tokenizer: Tokenizer, max_entries: int = 1 << 16) -> None:
        self._tokenizer = tokenizer
        self._cache: dict[int, str] = {}
        self._max_entries = max_entries

    def __call__(self, token_id: int) -> str:
        text = self._cache.get(token_id)
        if text is None:
            text = self._tokenizer.decode([token_id], skip_special_tokens=False)
            if len(self._cache) >= self._max_entries:
                self._cache.clear()
            self._cache[token_id] = text
        return text
