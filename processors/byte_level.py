"""Byte-level BPE (Llama 3's tokenizer): every byte is written as one printable character in token strings.

`byte_alphabet` is that table (the tiktoken conversion builds tokenizer.json with it); `TokenBytes` reads it
backwards to give a token's exact bytes, which OpenAI's logprob `bytes` fields carry.
"""

from __future__ import annotations

from typing import Any


def byte_alphabet() -> list[str]:
    """The byte-level alphabet: printable Latin-1 bytes stand for themselves; the other 68 bytes (controls,
    space, DEL, NBSP, soft hyphen) move to U+0100 and up, in byte order. Every token becomes printable."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    keep = set(printable)
    alphabet: list[str] = []
    moved = 0
    for byte in range(256):
        if byte in keep:
            alphabet.append(chr(byte))
        else:
            alphabet.append(chr(256 + moved))
            moved += 1
    return alphabet


class TokenBytes:
    """Exact UTF-8 bytes of a token, which is what OpenAI's `bytes` field is for: a token that ends inside a
    multi-byte character has text with U+FFFD, but its bytes let a client reassemble the character."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.decoder = {char: byte for byte, char in enumerate(byte_alphabet())}
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
