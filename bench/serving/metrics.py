"""Summaries of one load point, with the definitions vLLM's `benchmark_serving` and NVIDIA's aiperf use.

- TTFT: send to the first chunk that carries text.
- TPOT (per request): (E2E - TTFT) / (output tokens - 1), for requests with more than one token (aiperf calls
  this "inter token latency").
- ITL: every gap between two consecutive text chunks, pooled over all requests (vLLM's ITL); a chunk that
  carries several tokens counts once, so ITL differs from TPOT when a server batches tokens into chunks.
- E2E: send to the end of the stream.
- Throughput: successful requests, and their output tokens, per second of the point's elapsed time (first send
  to last answer, or to the end of the grace period).
Percentiles are numpy's linear interpolation, in milliseconds. Where the benchmark started the server itself,
the runner adds the server process's CPU time per request: work done, whatever else shares the machine.
"""

from __future__ import annotations

import collections

import numpy as np

from bench.serving.client import RequestResult

PERCENTILES = (50, 90, 99)


def distribution(values_s: list[float]) -> dict[str, float] | None:
    """mean and p50/p90/p99 in milliseconds, or None when there is nothing to summarize."""
    if not values_s:
        return None
    ms = np.asarray(values_s, dtype=np.float64) * 1000.0
    stats = {"mean": float(ms.mean())}
    stats.update({f"p{p}": float(np.percentile(ms, p)) for p in PERCENTILES})
    return stats


def summarize(results: list[RequestResult], elapsed_s: float, unsent: int = 0, cancelled: int = 0) -> dict:
    """The summary of one load point; `results` are the answered requests (ok or not)."""
    ok = [r for r in results if r.ok]
    errors = collections.Counter(r.error for r in results if not r.ok)
    examples = {}
    for r in results:
        if not r.ok and r.error not in examples:
            examples[r.error] = r.error_message
    output_tokens = sum(r.output_tokens for r in ok)
    prompt_tokens = [r.prompt_tokens for r in ok if r.prompt_tokens is not None]
    tpot = [(r.e2e - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
    itl = [b - a for r in ok for a, b in zip(r.chunk_times, r.chunk_times[1:], strict=False)]
    duration = max(elapsed_s, 1e-9)
    return {
        "requests": len(results) + cancelled,  # sent
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "cancelled": cancelled,  # still running at the end of the grace period
        "unsent": unsent,  # the sending window closed first
        "errors": dict(sorted(errors.items())),
        "error_examples": examples,
        "elapsed_s": elapsed_s,
        "request_throughput": len(ok) / duration,
        "output_throughput": output_tokens / duration,
        "total_token_throughput": (output_tokens + sum(prompt_tokens)) / duration,
        "output_tokens": output_tokens,
        "mean_prompt_tokens": float(np.mean(prompt_tokens)) if prompt_tokens else None,
        "mean_output_tokens": output_tokens / len(ok) if ok else None,
        # replies shorter than asked: the server stopped early (EOS) where it was told not to
        "short_replies": sum(r.output_tokens < r.expected_tokens for r in ok),
        "ttft_ms": distribution([r.ttft for r in ok]),
        "tpot_ms": distribution(tpot),
        "itl_ms": distribution(itl),
        "e2e_ms": distribution([r.e2e for r in ok]),
    }
