"""No request can hurt another inside the engine: values are checked at `add_request`, a value that still fails
inside a batched step fails its own request only (its step-mates finish with the tokens of a clean run), the
loop's breaker counts only failures nobody can be blamed for, and other threads read only published snapshots."""

from __future__ import annotations

import asyncio
import math
import threading

import pytest
import torch

from plm_serve.engine import (
    AsyncEngine,
    EngineConfig,
    EngineCore,
    EngineDeadError,
    EngineRequest,
    FinishReason,
    MMInput,
    RequestRejectedError,
    SamplingParams,
)
from plm_serve.offline import LLM

ENGINE_ARGS = dict(device="cpu", dtype="float32", num_kv_blocks=256, max_num_batched_tokens=1024)


@pytest.fixture(scope="module")
def core(ckpt_l) -> EngineCore:
    return EngineCore.load(EngineConfig(model=str(ckpt_l), **ENGINE_ARGS))


def prompt_ids(core: EngineCore, text: str) -> list[int]:
    return core.tokenizer.encode(text, add_special_tokens=True).ids


def run(core: EngineCore, requests: list[EngineRequest]) -> dict[str, tuple[list[int], FinishReason | None]]:
    """Add every request, step until idle; per request id: its choice-0 tokens and last finish reason."""
    out: dict[str, tuple[list[int], FinishReason | None]] = {}
    for r in requests:
        core.add_request(r)
        out[r.request_id] = ([], None)
    for _ in range(500):
        if not core.has_unfinished():
            break
        for o in core.step():
            tokens, reason = out[o.request_id]
            if o.index == 0:
                tokens.extend(o.token_ids)
            out[o.request_id] = (tokens, o.finish_reason or reason)
    assert not core.has_unfinished()
    core.scheduler.check_integrity()
    return out


def mates(core: EngineCore, tag: str) -> list[EngineRequest]:
    """Two well-behaved step-mates: one greedy, one seeded sampling (its RNG state must survive a retry)."""
    greedy = SamplingParams(max_tokens=6, min_tokens=6)
    seeded = SamplingParams(max_tokens=6, min_tokens=6, temperature=0.9, top_k=50, seed=7)
    return [
        EngineRequest(f"{tag}-greedy", prompt_ids(core, "The sea is"), greedy),
        EngineRequest(f"{tag}-seeded", prompt_ids(core, "Once upon a time"), seeded),
    ]


def test_a_value_that_fails_inside_the_step_fails_its_request_alone(core):
    clean = run(core, mates(core, "clean"))
    poisoned = EngineRequest("bad", prompt_ids(core, "Hi"), SamplingParams(max_tokens=6, temperature=1.0))
    requests = [*mates(core, "mixed"), poisoned]
    for r in requests:
        core.add_request(r)
    # A value that slipped past every boundary check (as `top_k: 2**63` once did): it overflows when the
    # runner stages the batch's sampling parameters, in the middle of everyone's step.
    poisoned.sampling.min_tokens = 2**63
    results: dict[str, tuple[list[int], FinishReason | None]] = {}
    for _ in range(500):
        if not core.has_unfinished():
            break
        for o in core.step():
            tokens, reason = results.get(o.request_id, ([], None))
            results[o.request_id] = (tokens + o.token_ids, o.finish_reason or reason)
            if o.request_id == "bad":
                assert o.finish_reason is FinishReason.ERROR and "Overflow" in (o.error or "")
    assert results["bad"][1] is FinishReason.ERROR
    assert results["mixed-greedy"] == (clean["clean-greedy"][0], FinishReason.LENGTH)
    assert results["mixed-seeded"] == (clean["clean-seeded"][0], FinishReason.LENGTH)
    assert core.unattributed_failure is None  # the culprit was found: the runner itself is fine
    core.scheduler.check_integrity()


def request_ids(core: EngineCore, sched) -> set[str]:
    return {seq.request_id for c in sched.chunks if (seq := core.scheduler.sequence(c.seq_id)) is not None}


def test_a_fault_after_sampling_is_retried_with_the_same_seeded_tokens(core, monkeypatch):
    clean = run(core, mates(core, "clean2"))
    launch = core.runner.launch
    calls = {"n": 0}

    def faulty(sched):
        pending = launch(sched)  # every row of the batch has sampled by now
        calls["n"] += 1
        if "victim" in request_ids(core, sched):
            raise RuntimeError("simulated fault after sampling")
        return pending

    monkeypatch.setattr(core.runner, "launch", faulty)
    victim = EngineRequest("victim", prompt_ids(core, "Hello there"), SamplingParams(max_tokens=4))
    results = run(core, [*mates(core, "again"), victim])
    assert results["victim"][1] is FinishReason.ERROR
    assert results["again-seeded"][0] == clean["clean2-seeded"][0]
    assert results["again-greedy"][0] == clean["clean2-greedy"][0]
    assert calls["n"] > 1  # it did retry


@pytest.mark.parametrize(
    ("sampling", "match"),
    [
        (dict(top_k=2**63), "top_k"),
        (dict(top_k=10**6), "top_k"),  # above the vocabulary (128256)
        (dict(temperature=math.inf), "temperature"),
        (dict(temperature=math.nan), "temperature"),
        (dict(top_p=math.nan), "top_p"),
        (dict(repetition_penalty=math.inf), "repetition_penalty"),
        (dict(repetition_penalty=1e-40), "repetition_penalty"),
        (dict(presence_penalty=math.nan), "presence_penalty"),
        (dict(logit_bias={5: math.nan}), "logit_bias"),
        (dict(logit_bias={10**6: 1.0}), "logit_bias"),
        (dict(stop_token_ids=[-1]), "stop_token_ids"),
        (dict(stop_token_ids=[2**40]), "stop_token_ids"),
        (dict(max_tokens=2**70), "max_tokens"),
        (dict(n=10**6), "n"),
        (dict(seed=2**64), "seed"),
        (dict(logprobs=21), "logprobs"),
        (dict(max_tokens=True), "max_tokens"),  # a bool is not a count
    ],
)
def test_bad_sampling_values_are_refused_before_they_reach_a_step(core, sampling, match):
    with pytest.raises((ValueError, RequestRejectedError), match=match):
        core.add_request(EngineRequest("x", prompt_ids(core, "Hi"), SamplingParams(**sampling)))
    assert not core.has_unfinished()


def test_bad_values_mutated_in_after_construction_are_refused_at_add_request(core):
    params = SamplingParams(max_tokens=4)
    params.top_k = 2**63  # SamplingParams is mutable: add_request checks again
    with pytest.raises(RequestRejectedError, match="top_k"):
        core.add_request(EngineRequest("x", prompt_ids(core, "Hi"), params))


def test_prompt_token_ids_are_checked_against_the_loaded_model(core):
    vocab = core.runner.vocab_size
    image = core.model_config.image_token_id
    for ids, match in [
        ([1, vocab], "vocabulary"),
        ([1, -3], "vocabulary"),
        ([1, 2**63], "vocabulary"),
        ([1, image, image], "placeholder"),  # media placeholder ids without media
    ]:
        with pytest.raises(RequestRejectedError, match=match):
            core.add_request(EngineRequest("x", ids, SamplingParams(max_tokens=2)))
    pixels = torch.zeros((1, 3, 448, 448), dtype=torch.uint8)
    ids = [1, *([image] * 256), 2]
    wrong_kind = MMInput("h", pixels, 1, 256, kind="video")
    with pytest.raises(RequestRejectedError, match="placeholder"):
        core.add_request(EngineRequest("x", ids, SamplingParams(max_tokens=2), [wrong_kind]))
    bad_pixels = MMInput("h", pixels.float(), 1, 256)
    with pytest.raises(RequestRejectedError, match="uint8"):
        core.add_request(EngineRequest("x", ids, SamplingParams(max_tokens=2), [bad_pixels]))
    assert not core.has_unfinished()


def make_async(ckpt) -> AsyncEngine:
    return AsyncEngine(EngineCore.load(EngineConfig(model=str(ckpt), **ENGINE_ARGS)))


async def drain(engine: AsyncEngine, request: EngineRequest) -> FinishReason | None:
    reason = None
    try:
        async for out in engine.generate(request):
            reason = out.finish_reason or reason
    except EngineDeadError:
        return None
    return reason


def test_the_breaker_ignores_failures_pinned_on_one_request(ckpt_l):
    engine = make_async(ckpt_l)
    launch = engine.core.runner.launch

    def poisoned(sched):
        if any(r.startswith("poison") for r in request_ids(engine.core, sched)):
            raise RuntimeError("poisoned request")
        return launch(sched)

    engine.core.runner.launch = poisoned
    tok = engine.core.tokenizer

    async def main():
        good = EngineRequest("good", tok.encode("Go on").ids, SamplingParams(max_tokens=30, min_tokens=30))
        poison = [
            EngineRequest(f"poison-{i}", tok.encode(f"x{i}").ids, SamplingParams(max_tokens=4))
            for i in range(12)
        ]
        return await asyncio.gather(drain(engine, good), *(drain(engine, p) for p in poison))

    good, *poison = asyncio.run(main())
    assert good is FinishReason.LENGTH and all(p is FinishReason.ERROR for p in poison)
    assert engine.is_healthy  # 12 failed requests, but the runner kept working for the others
    asyncio.run(engine.shutdown(1.0))


def test_the_breaker_stops_an_engine_whose_every_step_fails(ckpt_l):
    engine = make_async(ckpt_l)

    def broken(sched):
        raise RuntimeError("device lost")

    engine.core.runner.launch = broken
    tok = engine.core.tokenizer

    async def main():
        for i in range(10):
            await drain(engine, EngineRequest(f"r{i}", tok.encode("x").ids, SamplingParams(max_tokens=2)))
            if not engine.is_healthy:
                return i
        return None

    died_after = asyncio.run(main())
    assert died_after is not None and not engine.is_healthy


class ThreadCheckedProxy:
    """Wraps an object; records every attribute read made from a thread other than `owner`."""

    def __init__(self, target, owner: threading.Thread, foreign: list[str]) -> None:
        object.__setattr__(self, "_target", target)
        object.__setattr__(self, "_owner", owner)
        object.__setattr__(self, "_foreign", foreign)

    def __getattr__(self, name):
        if threading.current_thread() is not self._owner:
            self._foreign.append(f"{threading.current_thread().name}: {name}")
        return getattr(self._target, name)

    def __setattr__(self, name, value):
        setattr(self._target, name, value)


def test_other_threads_never_touch_the_scheduler(ckpt_l):
    """The event loop once read `Scheduler.num_waiting` while the engine thread mutated it (a 500 under load)."""
    engine = make_async(ckpt_l)
    foreign: list[str] = []
    engine.core.scheduler = ThreadCheckedProxy(engine.core.scheduler, engine._thread, foreign)
    tok = engine.core.tokenizer

    async def main():
        reqs = [
            EngineRequest(f"n{i}", tok.encode(f"count {i}").ids, SamplingParams(max_tokens=3, n=3))
            for i in range(6)
        ]
        results = await asyncio.gather(*(drain(engine, r) for r in reqs))
        stats = engine.stats()
        return results, stats

    results, stats = asyncio.run(main())
    assert all(r is not None for r in results)
    assert stats.num_waiting >= 0 and stats.num_running >= 0
    asyncio.run(engine.shutdown(1.0))
    assert foreign == []


def test_the_offline_llm_stays_usable_after_a_failed_request(ckpt_l, monkeypatch):
    llm = LLM(ckpt_l, **ENGINE_ARGS)
    launch = llm.core.runner.launch
    bad_ids = llm.processor.tokenizer.encode("poison", add_special_tokens=True).ids
    live = llm.core.scheduler.sequence

    def faulty(sched):
        if any((seq := live(c.seq_id)) and seq.token_ids[: len(bad_ids)] == bad_ids for c in sched.chunks):
            raise RuntimeError("simulated fault")
        return launch(sched)

    monkeypatch.setattr(llm.core.runner, "launch", faulty)
    with pytest.raises(RuntimeError, match="failed"):
        llm.generate(["a fine prompt", "poison", "another fine one"], SamplingParams(max_tokens=30))
    assert not llm.core.has_unfinished()  # the rest of the batch was aborted, not left inside
    (out,) = llm.generate("hello", SamplingParams(max_tokens=3, min_tokens=3))
    assert len(out.outputs[0].token_ids) == 3
    with pytest.raises(ValueError, match="top_k"):
        llm.generate("hello", SamplingParams(max_tokens=3, top_k=10**9))
    assert not llm.core.has_unfinished()
