"""The timing client against scripted servers (httpx.MockTransport): SSE parsing in both servers' styles, every
error kind, requests only to the target's URL; the load drivers' concurrency and deadline; the metric formulas."""

from __future__ import annotations

import asyncio
import json

import httpx
import numpy as np
import pytest

from bench.serving.client import RequestResult, Target, send
from bench.serving.flavors import FLAVORS
from bench.serving.load import LoadPoint, poisson_arrivals, run_point
from bench.serving.metrics import summarize
from bench.serving.plan import build_plan
from bench.serving.runner import run_plan_sync
from bench.serving.workload import RequestSpec

SPEC = RequestSpec("text-chat", [{"role": "user", "content": "hi"}], max_tokens=3)


def sse(*events, done: bool = True) -> bytes:
    lines = [f"data: {json.dumps(e)}\n\n" for e in events] + (["data: [DONE]\n\n"] if done else [])
    return "".join(lines).encode()


def delta(text: str | None = None, finish: str | None = None, **extra) -> dict:
    return {
        "choices": [
            {"index": 0, "delta": {"content": text} if text is not None else {}, "finish_reason": finish}
        ],
        **extra,
    }


def usage(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def run_send(handler, target: Target | None = None) -> RequestResult:
    target = target or Target("t", "http://127.0.0.1:9", model="m")

    async def go():
        async with target.http_client(httpx.MockTransport(handler)) as http:
            return await send(http, target, SPEC)

    return asyncio.run(go())


def test_vllm_style_stream_with_usage_chunk():
    seen = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        body = sse(
            delta(""), delta("a"), delta("b"), delta("c", "length"), {"choices": [], "usage": usage(7, 3)}
        )
        return httpx.Response(200, content=body)

    r = run_send(handler)
    assert r.ok and r.output_tokens == 3 and r.prompt_tokens == 7 and r.tokens_from_usage
    assert (
        len(r.chunk_times) == 3 and r.ttft == r.chunk_times[0] <= r.e2e
    )  # the empty role chunk is not a token
    (request,) = seen
    assert str(request.url) == "http://127.0.0.1:9/v1/chat/completions"
    body = json.loads(request.content)
    assert body["ignore_eos"] is True and body["model"] == "m" and body["max_tokens"] == 3


def test_transformers_style_stream_ends_without_done_and_counts_usage():
    def handler(request: httpx.Request) -> httpx.Response:
        body = sse(delta(""), delta("a"), delta("b"), delta(None, "length", usage=usage(5, 2)), done=False)
        return httpx.Response(200, content=body)

    r = run_send(handler, Target("hf", "http://127.0.0.1:9", flavor="transformers", model="/ckpt"))
    assert r.ok and r.output_tokens == 2 and r.prompt_tokens == 5 and len(r.chunk_times) == 2


def test_without_usage_the_text_chunks_are_counted():
    r = run_send(lambda req: httpx.Response(200, content=sse(delta("a"), delta("b", "stop"))))
    assert r.ok and r.output_tokens == 2 and not r.tokens_from_usage and r.prompt_tokens is None


@pytest.mark.parametrize(
    ("handler", "kind"),
    [
        (lambda req: httpx.Response(422, json={"detail": "Unexpected fields"}), "HTTP 422"),
        (lambda req: httpx.Response(500, text="Internal Server Error"), "HTTP 500"),
        (lambda req: httpx.Response(200, content=sse(delta("a"), {"error": "boom"})), "stream error"),
        (lambda req: httpx.Response(200, content=sse(delta("a"), done=False)), "incomplete stream"),
        (lambda req: httpx.Response(200, content=sse(delta(None, "stop"))), "no text"),
        (lambda req: httpx.Response(200, content=b"data: {not json\n\n"), "malformed stream"),
    ],
)
def test_failures_are_classified_never_raised(handler, kind):
    r = run_send(handler)
    assert not r.ok and r.error == kind and r.error_message


def test_transport_errors_are_classified():
    def refuse(request):
        raise httpx.ConnectError("refused", request=request)

    def slow(request):
        raise httpx.ReadTimeout("slow", request=request)

    assert run_send(refuse).error == "connection error"
    assert run_send(slow).error == "timeout"


def test_targets_only_accept_a_base_url_and_send_nowhere_else():
    assert Target("t", "http://127.0.0.1:8000/v1/").url == "http://127.0.0.1:8000"
    for bad in ("127.0.0.1:8000", "ftp://host", "http://"):
        with pytest.raises(ValueError, match="not an http"):
            Target("t", bad)
    hosts = set()

    def handler(request):
        hosts.add(request.url.host)
        return httpx.Response(302, headers={"location": "http://example.invalid/"})

    r = run_send(handler)
    assert r.error == "HTTP 302" and hosts == {"127.0.0.1"}  # redirects are not followed


def scripted_server(delay_s: float, tokens: int = 2):
    """A MockTransport handler that streams `tokens` chunks after `delay_s`, tracking requests in flight."""
    state = {"in_flight": 0, "max": 0}

    async def handler(request):
        state["in_flight"] += 1
        state["max"] = max(state["max"], state["in_flight"])
        try:
            await asyncio.sleep(delay_s)
        finally:
            state["in_flight"] -= 1
        events = [delta("x") for _ in range(tokens - 1)] + [
            delta("x", "length"),
            {"choices": [], "usage": usage(1, tokens)},
        ]
        return httpx.Response(200, content=sse(*events))

    return handler, state


def drive(handler, point: LoadPoint, n: int, duration_s: float | None = None, grace_s: float = 30.0):
    target = Target("t", "http://127.0.0.1:9", model="m")

    async def go():
        async with target.http_client(httpx.MockTransport(handler)) as http:
            specs = [SPEC] * n
            return await run_point(
                http, target, specs, point, duration_s=duration_s, grace_s=grace_s, progress=False
            )

    return asyncio.run(go())


def test_fixed_concurrency_keeps_exactly_that_many_in_flight():
    handler, state = scripted_server(0.02)
    run = drive(handler, LoadPoint("concurrency", 3), n=9)
    assert len(run.results) == 9 and (run.unsent, run.cancelled) == (0, 0) and state["max"] == 3
    assert 0.05 < run.elapsed_s < 1.0  # three waves of 20 ms


def test_the_sending_window_then_the_grace_period():
    handler, _ = scripted_server(0.3)
    # waves at 0 and 0.3 s are sent (the window closes at 0.45 s), the third never is; the second finishes in grace
    run = drive(handler, LoadPoint("concurrency", 2), n=6, duration_s=0.45)
    assert (len(run.results), run.unsent, run.cancelled) == (4, 2, 0) and run.elapsed_s == pytest.approx(
        0.6, abs=0.1
    )
    # a grace period too short for the second wave: it is cancelled at 0.55 s
    run = drive(handler, LoadPoint("concurrency", 2), n=6, duration_s=0.45, grace_s=0.1)
    assert (len(run.results), run.unsent, run.cancelled) == (2, 2, 2) and run.elapsed_s == pytest.approx(
        0.55, abs=0.05
    )
    handler, _ = scripted_server(0.01)
    run = drive(handler, LoadPoint("rate", 10), n=50, duration_s=0.3)  # about 3 arrivals fall in the window
    assert run.unsent > 40 and run.cancelled == 0 and len(run.results) + run.unsent == 50


def test_poisson_arrivals_are_seeded_with_the_asked_rate():
    a = poisson_arrivals(4.0, 4000, seed=3)
    assert a[0] == 0 and np.all(np.diff(a) >= 0) and np.array_equal(a, poisson_arrivals(4.0, 4000, seed=3))
    assert np.mean(np.diff(a)) == pytest.approx(0.25, rel=0.05)
    assert np.std(np.diff(a)) == pytest.approx(0.25, rel=0.1)  # exponential gaps: std = mean


def test_summary_formulas():
    def ok(chunks, tokens, e2e):
        return RequestResult(
            3, ttft=chunks[0], e2e=e2e, chunk_times=chunks, output_tokens=tokens, prompt_tokens=10
        )

    results = [
        ok([0.1, 0.2, 0.3], 3, 0.3),  # TPOT (0.3 - 0.1) / 2 = 100 ms; ITLs 100, 100
        ok([0.2, 0.6], 2, 0.7),  # TPOT 500 ms; ITL 400; one token short
        RequestResult(3, error="HTTP 500", error_message="Internal Server Error"),
        RequestResult(3, error="timeout"),
        RequestResult(3, error="HTTP 500"),
    ]
    s = summarize(results, elapsed_s=2.0, unsent=4, cancelled=1)
    assert (s["requests"], s["completed"], s["failed"], s["cancelled"], s["unsent"]) == (6, 2, 3, 1, 4)
    assert (
        s["errors"] == {"HTTP 500": 2, "timeout": 1}
        and s["error_examples"]["HTTP 500"] == "Internal Server Error"
    )
    assert (
        s["request_throughput"] == 1.0
        and s["output_throughput"] == 2.5
        and s["total_token_throughput"] == 12.5
    )
    assert s["short_replies"] == 1 and s["mean_prompt_tokens"] == 10 and s["mean_output_tokens"] == 2.5
    assert s["ttft_ms"]["p50"] == pytest.approx(150) and s["ttft_ms"]["mean"] == pytest.approx(150)
    assert s["tpot_ms"]["p50"] == pytest.approx(300) and s["tpot_ms"]["p99"] == pytest.approx(496)
    assert s["itl_ms"]["p50"] == pytest.approx(100) and s["itl_ms"]["p90"] == pytest.approx(340)
    assert s["e2e_ms"]["mean"] == pytest.approx(500)
    assert summarize([], elapsed_s=1.0)["ttft_ms"] is None


def test_run_plan_records_the_server_cpu_time_of_each_point():
    handler, _ = scripted_server(0.0)
    readings = iter([10.0, 12.5, 12.5, 13.5])  # before/after each of the two points (warm-up is not counted)
    target = Target("local", "http://127.0.0.1:9", model="m", cpu_clock=lambda: next(readings))
    plan = build_plan({"scenarios": {"text-chat": {"concurrency": [1, 2], "num_requests": 5, "warmup": 1}}})
    out = run_plan_sync(
        [target],
        plan,
        progress=False,
        log=lambda line: None,
        transports={"local": httpx.MockTransport(handler)},
    )
    assert [r["summary"]["server_cpu_s"] for r in out["runs"]] == [2.5, 1.0]
    assert [r["summary"]["server_cpu_s_per_request"] for r in out["runs"]] == [0.5, 0.2]
    assert out["targets"] == [
        {
            "name": "local",
            "url": "http://127.0.0.1:9",
            "flavor": "vllm",
            "flavor_fields": FLAVORS["vllm"],
            "model": "m",
        }
    ]
