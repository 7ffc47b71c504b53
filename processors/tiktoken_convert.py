"""Convert a tiktoken BPE file (Llama 3's `tokenizer.model`) into a `tokenizers` byte-level BPE tokenizer,
offline.

tiktoken stores only token bytes and ranks. The equivalent `tokenizers` model needs:
- a vocab over printable strings: each byte maps to one unicode character (the GPT-2 byte-level alphabet);
- merges with priorities: tiktoken merges the adjacent pair whose *concatenation* has the lowest rank, so
every way
  of splitting a token into two tokens is a merge, ranked by the token's rank (ties by the parts' ranks);
- `ignore_merges`, so that a whole pre-token found in the vocab is used as is, like tiktoken does.
transformers is not imported here: this runs in the server, where transformers is not a dependency.
"""

from __future__ import annotations

import base64
import importlib.util
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

from plm_serve.processors.byte_level import byte_alphabet

# Llama 3's pre-tokenizer split pattern (llama_models/llama3/tokenizer.py `pat_str`).
LLAMA3_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def read_tiktoken_ranks(path: str | Path) -> dict[bytes, int]:
    """Parse "<base64 token> <rank>" lines."""
    ranks: dict[bytes, int] = {}
    for line_no, line in enumerate(Path(path).read_text(encoding="ascii").splitlines(), 1):
        if not line.strip():
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
        except ValueError as e:
            raise ValueError(f"{path}:{line_no}: not a tiktoken line: {line[:80]!r}") from e
    return ranks


def recover_merges(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """Every (left, right) pair of tokens that concatenates to a token, in tiktoken's priority order."""
    keyed: list[tuple[int, int, int, bytes, bytes]] = []
    for token, rank in ranks.items():
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            left_rank, right_rank = ranks.get(left), ranks.get(right)
            if left_rank is not None and right_rank is not None:
                keyed.append((rank, left_rank, right_rank, left, right))
    keyed.sort(key=lambda k: k[:3])
    return [(left, right) for _, _, _, left, right in keyed]


def build_tokenizer(
    ranks: dict[bytes, int],
    special_tokens: list[str],
    bos_token: str = "<|begin_of_text|>",
    pattern: str = LLAMA3_SPLIT_PATTERN,
) -> Tokenizer:
    """A byte-level BPE `Tokenizer` equal to tiktoken with these ranks; `special_tokens` get ids after the
    ranks, in order. The post-processor prepends `bos_token` (so `encode(text)` starts with BOS, like Llama
    3)."""
    alphabet = byte_alphabet()

    def text(token: bytes) -> str:
        return "".join(alphabet[b] for b in token)

    vocab = {text(token): rank for token, rank in ranks.items()}
    merges = [(text(left), text(right)) for left, right in recover_merges(ranks)]
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, ignore_merges=True))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special_tokens])
    bos_id = tokenizer.token_to_id(bos_token)
    if bos_id is None:
        raise ValueError(f"bos_token {bos_token!r} is not among the special tokens")
    tokenizer.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single=f"{bos_token} $A",
                pair=f"{bos_token} $A {bos_token} $B",
                special_tokens=[(bos_token, bos_id)],
            ),
        ]
    )
    return tokenizer


def plm_special_tokens() -> list[str]:
    """PLM's 256 added tokens, ids 128000..128255 (docs/checkpoint-format.md, prompt format)."""
    named = {
        0: "<|begin_of_text|>",
        1: "<|end_of_text|>",
        2: "<|image|>",
        3: "<|video|>",
        4: "<|reserved_special_token_2|>",
        5: "<|reserved_special_token_3|>",
        6: "<|start_header_id|>",
        7: "<|end_header_id|>",
        8: "<|reserved_special_token_4|>",
        9: "<|eot_id|>",
    }
    # From 10 on the reserved numbering continues at 5: id 128010 is <|reserved_special_token_5|>.
    return [named.get(i, f"<|reserved_special_token_{i - 5}|>") for i in range(256)]


def llama3_tiktoken_file() -> Path:
    """The Llama 3 tiktoken file shipped inside the `llama-models` package (a dependency; located, not imported)."""
    spec = importlib.util.find_spec("llama_models")
    if spec is not None and spec.origin:
        path = Path(spec.origin).parent / "llama3" / "tokenizer.model"
        if path.is_file():
            return path
    raise FileNotFoundError(
        "the Llama 3 tokenizer file was not found: the llama-models package (a dependency of plm-serve) is "
        "missing; `pip install llama-models`"
    )


def convert_llama3_tokenizer() -> Tokenizer:
    """The PLM tokenizer (Llama 3 BPE + PLM's special tokens) from the `llama-models` tiktoken file."""
    return build_tokenizer(read_tiktoken_ranks(llama3_tiktoken_file()), plm_special_tokens())
