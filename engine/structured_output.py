"""Grammar-constrained decoding (structured outputs) with llguidance.

Public API:
    compiler = GrammarCompiler(tokenizer, vocab_size, eos_token_ids)   # thread-safe, LRU-cached
    grammar = compiler.compile(StructuredOutputParams("json_schema", schema_json))  # StructuredOutputError
    seq.grammar = grammar.matcher()                 # one matcher per sequence (choice), in its start state
    mask = grammar_bitmask(seqs, vocab_size, pin)   # core: the allowed tokens of a step's constrained rows
    apply_grammar_bitmask(logits, row_seq_ids, mask)  # runner: mask those rows of the logits, in place
    done = advance_grammars([(seq, token), ...])    # core: feed sampled tokens; sequences whose grammar ended

Why llguidance (rather than xgrammar): it is one abi3 wheel with no Python dependencies (xgrammar needs
transformers, triton and apache-tvm-ffi at run time), it builds its tokenizer from the `tokenizers` JSON the
engine already has, it compiles a grammar lazily in about a millisecond (no per-schema ahead-of-time automaton),
and one library covers JSON Schema, regular expressions, choices, Lark and GBNF grammars.

Where the work happens:
  * Compiling (`GrammarCompiler.compile`) builds an `LLMatcher` in its start state. The server calls it through
    `AsyncEngine.compile_grammar` on a worker thread before it submits the request, so a bad schema is a 400
    and the engine thread finds the grammar in the cache. Every choice deep-copies the cached matcher.
  * Per step, the core asks each constrained row's matcher for its token bitmask (llguidance fills them in
    parallel with the GIL released) and hands the int32 [R, ceil(V/32)] bitmask to the runner with the step;
    the runner copies it to the device once, unpacks it there and sets disallowed logits to -inf, all rows at
    once: no host sync per row. A mask needs the previous token, so in the overlapped loop a constrained
    sequence is not scheduled while its token is in flight: it decodes every other step, the others overlap.
  * After sampling, each matcher consumes its row's token; a matcher that cannot go on (its grammar is complete,
    e.g. the closing brace of a JSON object) ends the sequence with finish reason "stop".
  * Preemption needs no rollback: the tokens a sequence keeps are exactly those its matcher consumed.

JSON whitespace: no free whitespace. Objects and arrays use exactly ", " between items and ": " after keys
(json.dumps' default layout, which Llama-3 tokenizes into single tokens) and nothing else between tokens, so a
model cannot pad the output with spaces or newlines forever; the only freedom left is the content itself.
A schema may opt into flexible whitespace with llguidance's `"x-guidance": {"whitespace_flexible": true}`.
"""

from __future__ import annotations

import json
import logging
import threading
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import numpy as np
import torch

from plm_serve.engine.errors import RequestRejectedError
from plm_serve.engine.request import StructuredOutputParams
from plm_serve.engine.scheduler_output import GrammarBitmask

if TYPE_CHECKING:
    from tokenizers import Tokenizer


class _Constrained(Protocol):
    """What grammar masking reads of a sequence (engine/sequence.py; not imported: the runner imports this)."""

    seq_id: int
    grammar: Any  # its llguidance.LLMatcher


_C = TypeVar("_C", bound=_Constrained)

logger = logging.getLogger(__name__)

# The layout of generated JSON (see the module docstring). Defaults: a schema's own "x-guidance" overrides them.
JSON_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
ANY_JSON_OBJECT = '{"type": "object"}'
_CACHE_SIZE = 256  # compiled grammars kept (each is a matcher in its start state: a few kB to a few MB)


class StructuredOutputError(RequestRejectedError):
    """The grammar of a request cannot be compiled (bad schema, regex or grammar); the message says why."""


class StructuredOutputUnavailable(RequestRejectedError):
    """llguidance is not installed: structured outputs are refused, everything else works."""


def _llguidance() -> Any:
    try:
        import llguidance
    except ImportError as exc:
        raise StructuredOutputUnavailable(
            "structured outputs (response_format, tool_choice required/named, guided decoding) need the "
            "llguidance package, which is not installed on this server (pip install llguidance)"
        ) from exc
    return llguidance


def is_available() -> bool:
    """Whether structured outputs can be served (the llguidance package imports)."""
    try:
        _llguidance()
    except StructuredOutputUnavailable:
        return False
    return True


class CompiledGrammar:
    """A grammar compiled for the engine's tokenizer: hands out matchers in the grammar's start state."""

    def __init__(self, template: Any) -> None:
        self._template = template  # never advanced; deep_copy only reads it

    def matcher(self) -> Any:
        """A fresh `llguidance.LLMatcher` for one sequence."""
        return self._template.deep_copy()


class GrammarCompiler:
    """Compiles `StructuredOutputParams` for one tokenizer; safe to call from any thread, LRU-cached."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        vocab_size: int,
        eos_token_ids: Iterable[int],
        cache_size: int = _CACHE_SIZE,
    ) -> None:
        self._tokenizer = tokenizer
        self._vocab_size = vocab_size
        self._eos_token_ids = list(eos_token_ids)
        self._cache_size = cache_size
        self._cache: OrderedDict[StructuredOutputParams, CompiledGrammar] = OrderedDict()
        self._lock = threading.Lock()
        self._ll_tokenizer: Any = None  # built on first use (about 1 s for a 128k vocabulary)

    def compile(self, params: StructuredOutputParams) -> CompiledGrammar:
        """The compiled grammar of `params`; raises StructuredOutputError naming what does not compile."""
        with self._lock:
            cached = self._cache.get(params)
            if cached is not None:
                self._cache.move_to_end(params)
                return cached
        llg = _llguidance()
        grammar = self._grammar_text(llg, params)
        matcher = llg.LLMatcher(self._tokenizer_for(llg), grammar, log_level=0)  # drops the GIL
        if matcher.is_error():
            raise StructuredOutputError(f"the {_describe(params)} cannot be compiled: {matcher.get_error()}")
        compiled = CompiledGrammar(matcher)
        with self._lock:
            self._cache[params] = compiled
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return compiled

    def _tokenizer_for(self, llg: Any) -> Any:
        with self._lock:
            if self._ll_tokenizer is None:
                self._ll_tokenizer = llg.LLTokenizer(
                    self._tokenizer.to_str(), n_vocab=self._vocab_size, eos_token=self._eos_token_ids
                )
            return self._ll_tokenizer

    @staticmethod
    def _grammar_text(llg: Any, params: StructuredOutputParams) -> str:
        """`params` as an llguidance grammar definition (a JSON string)."""
        kind, spec = params.kind, params.spec
        try:
            if kind in ("json_schema", "json_object"):
                schema = spec if kind == "json_schema" else ANY_JSON_OBJECT
                return llg.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_LAYOUT)
            if kind == "regex":
                return llg.LLMatcher.grammar_from_regex(spec)
            if kind == "choice":
                choices = json.loads(spec)
                if not choices or not all(isinstance(c, str) for c in choices):
                    raise ValueError("choice must be a non-empty list of strings")
                return llg.grammar_from("choice", choices)
            return llg.grammar_from("grammar", spec)  # Lark, or GBNF converted to Lark
        except ValueError as exc:
            raise StructuredOutputError(f"the {_describe(params)} cannot be compiled: {exc}") from exc


def lark_json(schema: dict[str, Any]) -> str:
    """`%json {schema}` for a Lark grammar, with the generated-JSON layout above (an embedded schema would
    otherwise allow free whitespace)."""
    layout = {**JSON_LAYOUT, **schema.get("x-guidance", {})}
    return "%json " + json.dumps({**schema, "x-guidance": layout})


def _describe(params: StructuredOutputParams) -> str:
    return {
        "json_schema": "JSON schema",
        "json_object": "JSON object grammar",
        "regex": "regular expression",
        "choice": "choice list",
        "grammar": "grammar",
    }[params.kind]


# ------------------------------------------------------------------------------------------------ per step
_executor: Any = None
_executor_lock = threading.Lock()


def _parallel_executor(llg: Any) -> Any:
    """One llguidance thread pool for the process (mask filling and token consumption)."""
    global _executor
    with _executor_lock:
        if _executor is None:
            _executor = llg.LLExecutor()
        return _executor


def grammar_bitmask(constrained: Sequence[_Constrained], vocab_size: int, pin: bool) -> GrammarBitmask | None:
    """The allowed tokens of each constrained sequence's next token, filled by the grammar matchers in
    parallel (the GIL released) into one int32 [R, ceil(V / 32)] host tensor (pinned for a CUDA step)."""
    if not constrained:
        return None
    llg = _llguidance()
    words = (vocab_size + 31) // 32
    # The caching host allocator keeps a pinned block alive until its asynchronous copy is done.
    bits = torch.empty((len(constrained), words), dtype=torch.int32, pin_memory=pin)
    matchers = [(seq.grammar, row) for row, seq in enumerate(constrained)]
    _parallel_executor(llg).unsafe_compute_mask_ptr(matchers, bits.data_ptr(), words * 4, len(constrained))
    return GrammarBitmask([seq.seq_id for seq in constrained], bits)


def apply_grammar_bitmask(logits: torch.Tensor, row_seq_ids: list[int], mask: GrammarBitmask) -> None:
    """Set the logits of tokens a row's grammar forbids to -inf, in place. logits: [B, V], row i samples for
    `row_seq_ids[i]`; rows without a grammar are untouched. The bitmask goes to the device in one copy."""
    row_of = {seq_id: row for row, seq_id in enumerate(row_seq_ids)}
    rows = [row_of[seq_id] for seq_id in mask.seq_ids]
    # The complement's bits are the forbidden tokens: [R, V] bool without a separate negation pass.
    forbidden = unpack_bitmask(~mask.bits.to(logits.device, non_blocking=True), logits.shape[1])
    if rows == list(range(logits.shape[0])):
        logits.masked_fill_(forbidden, float("-inf"))
    else:
        pin = logits.device.type == "cuda"
        index = torch.tensor(rows, dtype=torch.long, pin_memory=pin).to(logits.device, non_blocking=True)
        logits[index] = logits[index].masked_fill(forbidden, float("-inf"))


def unpack_bitmask(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """int32 [R, W] (bit j of word w = token 32 w + j) -> bool [R, vocab_size], on the bitmask's device.

    Read as little-endian bytes (byte k of word w holds tokens 32 w + 8 k ...), so the expansion works on uint8:
    numpy's unpackbits on the CPU, eight shifts on a GPU ([R, 4 W, 8] bytes, a quarter of an int32 expansion).
    """
    as_bytes = bitmask.contiguous().view(torch.uint8)  # [R, 4 W]; every supported device is little-endian
    unpack = _unpack_with_numpy if as_bytes.device.type == "cpu" else unpack_with_shifts
    return unpack(as_bytes)[:, :vocab_size].bool()


def _unpack_with_numpy(as_bytes: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(np.unpackbits(as_bytes.numpy(), axis=1, bitorder="little"))


def unpack_with_shifts(as_bytes: torch.Tensor) -> torch.Tensor:
    """uint8 [R, B] -> uint8 [R, 8 B] of 0/1, bit j of byte b at 8 b + j (the device path)."""
    shifts = torch.arange(8, dtype=torch.uint8, device=as_bytes.device)
    return ((as_bytes.unsqueeze(-1) >> shifts) & 1).flatten(1)


def advance_grammars(sampled: Sequence[tuple[_C, int]]) -> list[_C]:
    """Feed each sequence's sampled token to its matcher; return the sequences whose grammar cannot go on
    (complete, or in error after a token the mask did not allow, which is logged)."""
    pairs = [(seq, token) for seq, token in sampled if seq.grammar is not None]
    if not pairs:
        return []
    llg = _llguidance()
    results = _parallel_executor(llg).consume_token_par([(seq.grammar, token) for seq, token in pairs])
    done = []
    for (seq, token), ok in zip(pairs, results, strict=True):
        if not ok:
            logger.warning(
                "%r: token %d is outside its grammar (%s); ending the sequence",
                seq,
                token,
                seq.grammar.get_error(),
            )
        if not ok or seq.grammar.is_stopped():
            done.append(seq)
    return done
