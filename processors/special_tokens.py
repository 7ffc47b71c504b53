"""Control tokens are the chat template's alone: special-token strings inside message text are tokenized as text.

Tokenizing the rendered template in one piece would turn `<|eot_id|><|start_header_id|>system...` typed by a
user into real control tokens: a forged end of turn and a forged system turn. Instead:

1. `guard(text)` marks every message text before rendering: GUARD goes after each character that can start a
   special token, and at the start of the text (after leading whitespace, so the template's `trim` still
   sees it), so no special-token string can occur in or across the text once rendered.
2. `encode(rendered)` splits the rendered prompt at the special-token strings left in it, which are therefore
   the template's own, and maps them to their ids; the text between them has GUARD removed and is tokenized
   with special-token matching off (`encode_special_tokens`), in one `encode_batch` call.

For text without special-token strings the ids equal tokenizing the rendered string whole: `tokenizers` splits
its input at special tokens first and tokenizes the pieces independently, which is what step 2 does (the
lstrip/rstrip options of special tokens are applied the same way). GUARD is a lone surrogate: no valid text
contains one (request bodies with one are refused), so removing it restores the text exactly. Templates that
pass text through or `trim` it render the same text as without the guard.
"""

from __future__ import annotations

import re

from tokenizers import Tokenizer

from plm_serve.processors.tokenizer import encode_texts

GUARD = "\udfff"


class TemplateTokenizer:
    """Tokenizes rendered chat prompts so that only the template's markers become control tokens."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        specials = [t for t in tokenizer.get_added_tokens_decoder().items() if t[1].special]
        self._ids = {token.content: token_id for token_id, token in specials}
        self._lstrip = {token.content for _, token in specials if token.lstrip}
        self._rstrip = {token.content for _, token in specials if token.rstrip}
        self._first_chars = sorted({content[0] for content in self._ids if content})
        contents = sorted(self._ids, key=len, reverse=True)  # longest first: a token is never cut short
        self._split = re.compile("|".join(map(re.escape, contents))) if contents else None
        self._plain = Tokenizer.from_str(tokenizer.to_str())  # a copy: the switch below is per instance
        self._plain.encode_special_tokens = True
        self._plain.no_truncation()
        self._plain.no_padding()

    def guard(self, text: str) -> str:
        """`text` with GUARD wherever a special-token string could start (see the module docstring). `text`
        must be valid Unicode (no lone surrogates: `messages.parse_messages` refuses them)."""
        for char in self._first_chars:
            if char in text:
                text = text.replace(char, char + GUARD)
        body = text.lstrip()
        return text[: len(text) - len(body)] + GUARD + body if body else text

    def encode(self, rendered: str) -> list[int]:
        """Ids of a prompt rendered from guarded texts: template markers special, everything else text."""
        if self._split is None:
            return encode_texts(self._plain, [rendered.replace(GUARD, "")], add_special_tokens=False)[0]
        pieces: list[str] = []
        markers: list[str] = []
        start = 0
        for match in self._split.finditer(rendered):
            pieces.append(rendered[start : match.start()])
            markers.append(match.group())
            start = match.end()
        pieces.append(rendered[start:])
        for i, marker in enumerate(markers):  # a special token's lstrip/rstrip eat the whitespace beside it
            if marker in self._lstrip:
                pieces[i] = pieces[i].rstrip()
            if marker in self._rstrip:
                pieces[i + 1] = pieces[i + 1].lstrip()
        texts = [p.replace(GUARD, "") for p in pieces]
        encoded = encode_texts(self._plain, [t for t in texts if t], add_special_tokens=False)
        chunks = iter(encoded)
        ids: list[int] = []
        for i, text in enumerate(texts):
            if text:
                ids += next(chunks)
            if i < len(markers):
                ids.append(self._ids[markers[i]])
        return ids
