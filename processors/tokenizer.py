"""The checkpoint tokenizer: `tokenizer.json` through the `tokenizers` library, plus
`tokenizer_config.json`."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from plm_serve.processors.errors import CheckpointConfigError


@dataclass(frozen=True, slots=True)
class TokenizerConfig:
    """The parts of `tokenizer_config.json` (and `special_tokens_map.json`) the processors use."""

    bos_token: str | None = "<|begin_of_text|>"
    eos_token: str | None = "<|eot_id|>"
    pad_token: str | None = None
    unk_token: str | None = None
    image_token: str = "<|image|>"
    video_token: str = "<|video|>"
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def template_tokens(self) -> dict[str, str]:
        """Special tokens as template variables (transformers passes `special_tokens_map`)."""
        names = ("bos_token", "eos_token", "pad_token", "unk_token", "image_token", "video_token")
        return {name: getattr(self, name) for name in names if getattr(self, name) is not None}


def _token(value: Any) -> str | None:
    """A special token is a string, or (older files) an AddedToken dict with "content"."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def load_tokenizer_config(folder: Path) -> TokenizerConfig:
    """tokenizer_config.json (+ special_tokens_map.json of 4.x folders); absent keys keep PLM's defaults."""
    raw: dict[str, Any] = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):  # the latter wins
        path = folder / name
        if path.is_file():
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError) as e:
                raise CheckpointConfigError(f"cannot read {path}: {e}") from e
            if isinstance(data, dict):
                raw.update(data)
    extra = raw.get("extra_special_tokens")
    extra = extra if isinstance(extra, dict) else {}
    defaults = TokenizerConfig()
    return TokenizerConfig(
        bos_token=_token(raw.get("bos_token")) if "bos_token" in raw else defaults.bos_token,
        eos_token=_token(raw.get("eos_token")) if "eos_token" in raw else defaults.eos_token,
        pad_token=_token(raw.get("pad_token")),
        unk_token=_token(raw.get("unk_token")),
        image_token=_token(raw.get("image_token"))
        or _token(extra.get("image_token"))
        or defaults.image_token,
        video_token=_token(raw.get("video_token"))
        or _token(extra.get("video_token"))
        or defaults.video_token,
        raw=raw,
    )


def load_tokenizer(folder: Path) -> Tokenizer:
    """`tokenizer.json` as a `tokenizers.Tokenizer` with any saved truncation/padding switched off."""
    path = folder / "tokenizer.json"
    if not path.is_file():
        raise CheckpointConfigError(f"{folder} has no tokenizer.json")
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as e:
        raise CheckpointConfigError(f"cannot load {path}: {e}") from e
    tokenizer.no_truncation()
    tokenizer.no_padding()
    return tokenizer


def token_id(tokenizer: Tokenizer, token: str, what: str) -> int:
    """Id of a token that must exist in the vocabulary."""
    value = tokenizer.token_to_id(token)
    if value is None:
        raise CheckpointConfigError(f"the tokenizer has no {what} {token!r}")
    return value


def encode_texts(tokenizer: Tokenizer, texts: list[str], *, add_special_tokens: bool) -> list[list[int]]:
    """Token ids of each text. `encode_batch` releases the GIL while it works (`encode` does not): a long text
    tokenized in a worker thread must not stall the event loop and every other request with it."""
    return [e.ids for e in tokenizer.encode_batch(texts, add_special_tokens=add_special_tokens)]


def max_chars_per_token(tokenizer: Tokenizer) -> int | None:
    """The most characters of input one token can cover, or None when that cannot be bounded.

    Every token's vocabulary string is at least as long as the text it stands for (byte-level pieces use
    one character per byte, SentencePiece's byte fallback six), so a text of C characters needs at least
    ceil(C / max) tokens. A normalizer could shrink the text before tokenizing: then no bound is claimed.
    """
    if tokenizer.normalizer is not None:
        return None
    return max((len(piece) for piece in tokenizer.get_vocab(with_added_tokens=True)), default=None)
