"""CPU cost of structured outputs per decode step: the grammar mask of the batch and the matcher advance.

Every row of the batch follows the same JSON schema (an object of an enum, a bounded integer, a boolean, a bounded
string and an array, like a tool call's arguments); each step, `grammar_bitmask` fills the rows' bitmasks
(llguidance, in parallel) and `apply_grammar_bitmask` unpacks them and masks [B, 128256] fp32 logits, then `advance_grammars` feeds each row
the next token of a valid answer (a matcher that finishes starts over). Also timed once: building llguidance's
tokenizer for the 128k vocabulary and compiling the schema.

    python bench/structured_output.py [--steps 200] [--out bench/results]

Writes bench/results/structured-output-<date>-cpu.md with the table, the date and the CPU model.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import time
from pathlib import Path

import source_tree  # bench/ is first on sys.path when a script here runs
import torch

source_tree.ensure_importable()

from tokenizers import Tokenizer

from bench.machine import cpu_model
from plm_serve.engine.request import SamplingParams, StructuredOutputParams
from plm_serve.engine.sequence import Sequence
from plm_serve.engine.structured_output import (
    GrammarCompiler,
    advance_grammars,
    apply_grammar_bitmask,
    grammar_bitmask,
)
from tests import reference

VOCAB = 128256
EOS = (128001, 128009)
BATCHES = (1, 16, 64)
SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"enum": ["Paris", "Rome", "Oslo"]},
        "celsius": {"type": "integer", "minimum": -50, "maximum": 50},
        "sunny": {"type": "boolean"},
        "summary": {"type": "string", "maxLength": 40},
        "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 3},
    },
    "required": ["city", "celsius", "sunny", "summary", "tags"],
    "additionalProperties": False,
}
ANSWER = {
    "city": "Oslo",
    "celsius": -3,
    "sunny": False,
    "summary": "Cold and clear all day",
    "tags": ["a", "b"],
}


def measure(compiler: GrammarCompiler, answer: list[int], batch: int, steps: int) -> tuple[float, float]:
    """Mean microseconds per step of (mask, advance) for `batch` constrained rows."""
    grammar = compiler.compile(StructuredOutputParams("json_schema", json.dumps(SCHEMA)))
    seqs = [Sequence(i, f"r{i}", 0, [1], 1, SamplingParams()) for i in range(batch)]
    positions = [i % len(answer) for i in range(batch)]  # rows at different places of the answer
    for seq, pos in zip(seqs, positions, strict=True):
        seq.grammar = grammar.matcher()
        assert seq.grammar.consume_tokens(answer[:pos])
    logits = torch.zeros(batch, VOCAB)
    row_seq_ids = [s.seq_id for s in seqs]
    mask_ns = advance_ns = 0
    for _ in range(steps):
        t0 = time.perf_counter_ns()
        mask = grammar_bitmask(seqs, VOCAB, pin=False)  # the core's half of the step
        assert mask is not None
        apply_grammar_bitmask(logits, row_seq_ids, mask)  # the runner's half
        t1 = time.perf_counter_ns()
        done = advance_grammars([(s, answer[p]) for s, p in zip(seqs, positions, strict=True)])
        t2 = time.perf_counter_ns()
        mask_ns, advance_ns = mask_ns + t1 - t0, advance_ns + t2 - t1
        for i, seq in enumerate(seqs):
            positions[i] += 1
            if seq in done or positions[i] == len(answer):
                seq.grammar, positions[i] = grammar.matcher(), 0
    return mask_ns / steps / 1000, advance_ns / steps / 1000


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args()
    torch.set_num_threads(1)
    tokenizer = Tokenizer.from_file(str(reference.tiny_checkpoint(reference.PE_L) / "tokenizer.json"))
    compiler = GrammarCompiler(tokenizer, VOCAB, EOS)
    t0 = time.perf_counter()
    compiler.compile(StructuredOutputParams("regex", "warm-up"))  # builds llguidance's tokenizer
    t1 = time.perf_counter()
    compiler.compile(StructuredOutputParams("json_schema", json.dumps(SCHEMA)))
    t2 = time.perf_counter()
    answer = [*tokenizer.encode(json.dumps(ANSWER), add_special_tokens=False).ids, EOS[1]]
    lines = [
        "| batch | mask µs/step | advance µs/step | total µs/step | µs/row |",
        "|---:|---:|---:|---:|---:|",
    ]
    for batch in BATCHES:
        mask_us, advance_us = measure(compiler, answer, batch, args.steps)
        total = mask_us + advance_us
        lines.append(f"| {batch} | {mask_us:.0f} | {advance_us:.0f} | {total:.0f} | {total / batch:.0f} |")
    text = "\n".join(lines)
    today = datetime.date.today().isoformat()
    header = (
        f"# Structured-output cost per decode step ({today})\n\n"
        f"CPU: {cpu_model()}; Python {platform.python_version()}; torch {torch.__version__}; 1 torch thread; "
        f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores (a shared machine inflates the times).\n"
        f"`python bench/structured_output.py --steps {args.steps}`: every row constrained by the same JSON schema "
        f"({len(answer)}-token answer), logits [batch, {VOCAB}] fp32 on the CPU. One-time: llguidance tokenizer "
        f"{t1 - t0:.2f} s, schema compile {1000 * (t2 - t1):.1f} ms.\n\n"
    )
    print(header + text)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"structured-output-{today}-cpu.md"
    path.write_text(header + text + "\n", encoding="utf-8")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
