"""AsyncEngine: the loop thread, per-request streams, abort on disconnect, overload and death."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from plm_serve.engine import (
    AsyncEngine,
    EngineConfig,
    EngineCore,
    EngineDeadError,
    EngineOverloadedError,
    FinishReason,
    RequestRejectedError,
)
from tests import reference
from tests.engine import engine_fixtures as fx


@pytest.fixture(scope="module")
def prompts(ckpt_l):
    return fx.standard_prompts(reference.load_hf_processor(ckpt_l))


def make_engine(ckpt, **overrides) -> AsyncEngine:
    args = dict(
        model=str(ckpt), device="cpu", dtype="float32", num_kv_blocks=512, max_num_batched_tokens=2048
    )
    args.update(overrides)
    return AsyncEngine(EngineCore.load(EngineConfig(**args)))


async def collect(engine: AsyncEngine, req) -> tuple[list[int], str, FinishReason | None]:
    tokens, text, reason = [], "", None
    async for out in engine.generate(req):
        tokens += out.token_ids
        text += out.text
        reason = out.finish_reason or reason
    return tokens, text, reason


def wait_idle(engine: AsyncEngine) -> None:
    deadline = time.monotonic() + 10
    while engine.core.has_unfinished() and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.05)
    engine.core.scheduler.check_integrity()


def test_concurrent_streams_get_their_own_greedy_outputs(ckpt_l, prompts):
    engine = make_engine(ckpt_l)
    reqs = [fx.request(prompts[i % len(prompts)], f"c{i}", max_tokens=6, min_tokens=6) for i in range(8)]

    async def main():
        return await asyncio.gather(*(collect(engine, r) for r in reqs))

    results = asyncio.run(main())
    alone = asyncio.run(collect(engine, fx.request(prompts[1], "alone", max_tokens=6, min_tokens=6)))
    assert results[1][0] == alone[0] and results[1][1] == alone[1]
    assert all(len(tokens) == 6 and reason == FinishReason.LENGTH for tokens, _, reason in results)
    wait_idle(engine)
    asyncio.run(engine.shutdown(1.0))


def test_closing_the_stream_aborts_and_frees_blocks(ckpt_l, prompts):
    engine = make_engine(ckpt_l)
    free = engine.core.scheduler.block_manager.num_free_blocks

    async def main():
        gen = engine.generate(fx.request(prompts[1], "gone", max_tokens=500, min_tokens=500))
        async for out in gen:
            if out.num_output_tokens >= 2:
                break
        await gen.aclose()  # what the server does when the client disconnects

    asyncio.run(main())
    wait_idle(engine)
    assert engine.core.scheduler.block_manager.num_free_blocks == free
    asyncio.run(engine.shutdown(1.0))


def test_rejected_request_raises_without_hurting_others(ckpt_l, prompts):
    engine = make_engine(ckpt_l, max_model_len=2000)

    async def main():
        bad = fx.request(prompts[0], "bad", max_tokens=5000)
        good = collect(engine, fx.request(prompts[0], "good", max_tokens=3, min_tokens=3))
        with pytest.raises(RequestRejectedError, match=r"max_model_len|context"):
            await collect(engine, bad)
        return await good

    tokens, _, _ = asyncio.run(main())
    assert len(tokens) == 3 and engine.is_healthy
    asyncio.run(engine.shutdown(1.0))


def test_full_queue_is_a_typed_overloaded_error(ckpt_l, prompts):
    engine = make_engine(ckpt_l, max_waiting_requests=2)
    gate = threading.Event()
    step = engine.core.step
    engine.core.step = lambda: (gate.wait(10), step())[1]  # hold the loop inside a step

    async def main():
        first = asyncio.ensure_future(collect(engine, fx.request(prompts[0], "a", max_tokens=2)))
        second = asyncio.ensure_future(collect(engine, fx.request(prompts[0], "b", max_tokens=2)))
        await asyncio.sleep(0.1)
        with pytest.raises(EngineOverloadedError, match="overloaded"):
            await collect(engine, fx.request(prompts[0], "c", max_tokens=2))
        gate.set()
        return await asyncio.gather(first, second)

    results = asyncio.run(main())
    assert [len(r[0]) for r in results] == [2, 2]
    asyncio.run(engine.shutdown(1.0))


def test_a_dead_loop_fails_every_waiter_and_reports_unhealthy(ckpt_l, prompts):
    """Steps that fail for everyone (nothing can be blamed on one request) trip the breaker: the loop stops,
    every waiter gets an error (the failing request's ERROR, then EngineDeadError) and the engine is unhealthy."""
    engine = make_engine(ckpt_l)
    started = threading.Event()

    def broken_step():
        started.set()
        raise MemoryError("simulated device failure")

    engine.core.step = broken_step

    async def main():
        reasons = []
        for i in range(12):
            try:
                _, _, reason = await asyncio.wait_for(
                    collect(engine, fx.request(prompts[0], f"x{i}", max_tokens=2)), 10
                )
                reasons.append(reason)
            except EngineDeadError as exc:
                assert "simulated device failure" in str(exc)
                break
        with pytest.raises(EngineDeadError, match="simulated device failure"):
            await collect(engine, fx.request(prompts[0], "y", max_tokens=2))
        return reasons

    reasons = asyncio.run(main())
    assert started.is_set() and not engine.is_healthy
    assert reasons and all(r is FinishReason.ERROR for r in reasons)


def test_shutdown_finishes_running_requests_within_the_grace_period(ckpt_l, prompts):
    engine = make_engine(ckpt_l)

    async def main():
        running = asyncio.ensure_future(
            collect(engine, fx.request(prompts[0], "r", max_tokens=5, min_tokens=5))
        )
        await asyncio.sleep(0.05)
        await engine.shutdown(10.0)
        with pytest.raises(EngineDeadError, match=r"shutting down|not running"):
            await collect(engine, fx.request(prompts[0], "late", max_tokens=2))
        return await running

    tokens, _, reason = asyncio.run(main())
    assert len(tokens) == 5 and reason == FinishReason.LENGTH
