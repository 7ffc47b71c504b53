"""Prometheus metrics: one registry per app (no process globals, so tests can build many apps).

Request-level histograms are observed by `RequestRecorder` as StepOutputs flow past; engine gauges and cache
counters are read from `engine.stats()` at scrape time by `EngineCollector`, so the engine never pushes
anything. Names follow vLLM's where one exists (with the `plm_` prefix), so existing dashboards map over.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from plm_serve.engine import EngineClient, StepOutput

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0)
_TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5)


class ServerMetrics:
    def __init__(self, engine_getter: Callable[[], EngineClient | None]) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.http_requests = Counter(
            "plm_http_requests", "HTTP requests by route and status code", ["route", "status"], registry=r
        )
        self.request_success = Counter(
            "plm_request_success", "Finished generations by finish reason", ["finish_reason"], registry=r
        )
        self.prompt_tokens = Counter("plm_prompt_tokens", "Prompt tokens of admitted requests", registry=r)
        self.generation_tokens = Counter("plm_generation_tokens", "Generated tokens", registry=r)
        # cause="server": an exception escaped the app (a bug; the answer was a 500). cause="engine": a request
        # failed inside the engine (its answer was a 500 or an in-band stream error). Every 5xx the server
        # produces is one of these, or a 503 (engine unavailable) counted by plm_http_requests_total.
        self.internal_errors = Counter(
            "plm_internal_errors",
            "Requests that failed on the server's side, by cause",
            ["cause"],
            registry=r,
        )
        for cause in ("server", "engine"):
            self.internal_errors.labels(cause)  # exported as 0 from the start
        self.ttft = Histogram(
            "plm_time_to_first_token_seconds",
            "Arrival to first output token",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.tpot = Histogram(
            "plm_time_per_output_token_seconds",
            "Mean time between output tokens after the first, per request",
            buckets=_TPOT_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            "plm_e2e_request_latency_seconds", "Arrival to last token", buckets=_LATENCY_BUCKETS, registry=r
        )
        self.queue_time = Histogram(
            "plm_request_queue_time_seconds",
            "Arrival to first scheduled (engine waiting queue)",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        r.register(EngineCollector(engine_getter))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class RequestRecorder:
    """Observes one request's outputs; `finish()` records its latency histograms once."""

    def __init__(self, metrics: ServerMetrics, arrival: float) -> None:
        self.metrics = metrics
        self.arrival = arrival
        self.first_token_at: float | None = None
        self.queue_recorded = False
        self.tokens_per_choice: dict[int, int] = {}
        self.finished = False

    def observe(self, out: StepOutput) -> None:
        now = time.monotonic()
        if self.first_token_at is None and out.token_ids:
            self.first_token_at = now
            self.metrics.ttft.observe(now - self.arrival)
        if out.queue_time_s is not None and not self.queue_recorded:
            self.queue_recorded = True  # n > 1 choices share the prompt: one queue time per request
            self.metrics.queue_time.observe(out.queue_time_s)
        self.tokens_per_choice[out.index] = out.num_output_tokens
        if out.finish_reason is not None:
            self.metrics.request_success.labels(out.finish_reason.value).inc()
            if out.finish_reason.value == "error":
                self.metrics.internal_errors.labels("engine").inc()

    def admitted(self, num_prompt_tokens: int) -> None:
        self.metrics.prompt_tokens.inc(num_prompt_tokens)

    def finish(self) -> None:
        if self.finished:
            return
        self.finished = True
        now = time.monotonic()
        self.metrics.e2e.observe(now - self.arrival)
        total = sum(self.tokens_per_choice.values())
        self.metrics.generation_tokens.inc(total)
        longest = max(self.tokens_per_choice.values(), default=0)
        if self.first_token_at is not None and longest > 1:
            self.metrics.tpot.observe((now - self.first_token_at) / (longest - 1))


class EngineCollector(Collector):
    """Engine gauges and cache counters, read from `engine.stats()` at scrape time."""

    def __init__(self, engine_getter: Callable[[], EngineClient | None]) -> None:
        self.engine_getter = engine_getter

    def collect(self) -> Iterator[Metric]:
        engine = self.engine_getter()
        healthy = engine is not None and engine.is_healthy
        yield GaugeMetricFamily(
            "plm_engine_healthy", "1 when the engine is loaded and its loop runs", healthy
        )
        if engine is None:
            return
        s = engine.stats()
        yield GaugeMetricFamily("plm_num_requests_running", "Sequences holding KV blocks", s.num_running)
        yield GaugeMetricFamily("plm_num_requests_waiting", "Sequences in the waiting queue", s.num_waiting)
        yield GaugeMetricFamily("plm_kv_cache_usage_perc", "Fraction of KV blocks in use (0..1)", s.kv_usage)
        yield GaugeMetricFamily("plm_num_kv_blocks", "KV blocks in the pool", s.num_kv_blocks)
        yield CounterMetricFamily(
            "plm_prefix_cache_queries", "Prompt tokens looked up", s.prefix_cache_queries
        )
        yield CounterMetricFamily(
            "plm_prefix_cache_hits", "Prompt tokens found in the cache", s.prefix_cache_hits
        )
        yield GaugeMetricFamily(
            "plm_prefix_cache_hit_rate",
            "prefix_cache_hits / prefix_cache_queries",
            _rate(s.prefix_cache_hits, s.prefix_cache_queries),
        )
        yield CounterMetricFamily("plm_encoder_cache_queries", "Media items needed", s.encoder_cache_queries)
        yield CounterMetricFamily(
            "plm_encoder_cache_hits", "Media items already encoded", s.encoder_cache_hits
        )
        yield GaugeMetricFamily(
            "plm_encoder_cache_hit_rate",
            "encoder_cache_hits / encoder_cache_queries",
            _rate(s.encoder_cache_hits, s.encoder_cache_queries),
        )
        yield CounterMetricFamily(
            "plm_num_preemptions", "Sequences preempted (recomputed)", s.num_preemptions
        )


def _rate(hits: int, queries: int) -> float:
    return hits / queries if queries else 0.0
