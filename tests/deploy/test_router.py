"""Scale-out on loopback: two demo replicas behind the shipped router configuration (deploy/router/).

One measured run per policy over the same kind of traffic: groups of requests that share a long system prompt
and an image and differ in the question, sent one after another and interleaved across groups. With
cache-aware routing every repeat of a group lands on the replica that served the group first, so its prompt
blocks and its image's encoder output are cached there; round-robin sends the repeats of a group to both
replicas (the group count is odd), so each replica pays the first miss. Then a replica is killed under load.
"""

from __future__ import annotations

import json
import os
import signal
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import httpx
import pytest

from plm_serve.server.demo import ensure_demo_checkpoint
from plm_serve.server.version import VERSION
from tests import reference
from tests.deploy.files import DEPLOY, flag_values, grouping_labels, referenced_metrics
from tests.deploy.fleet import ROUTED_WORKER_HEADER, Fleet, fleet_env, free_port, scrape
from tests.server import media

GROUPS = 5  # odd: round-robin then alternates each group's sequential repeats over the two replicas
REPEATS = 4
CACHE_COUNTERS = ("prefix_cache_hits", "prefix_cache_queries", "encoder_cache_hits", "encoder_cache_queries")


@dataclass
class Cluster:
    fleet: Fleet
    replicas: dict[str, int]  # base URL -> pid
    cache_aware: str  # router base URLs
    round_robin: str
    model: str


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fleet")
    cache = reference.cache_root() / "xdg"  # the demo checkpoint persists with the other test checkpoints
    ensure_demo_checkpoint(cache / "plm-serve", VERSION)  # built here once, not by two replicas racing
    fleet = Fleet(folder, fleet_env(cache))
    try:
        replicas = {}
        for i in range(2):
            port = free_port()
            replicas[f"http://127.0.0.1:{port}"] = fleet.start_replica(f"replica-{i}", port)
        for url, process in replicas.items():
            fleet.wait_ok(process, f"{url}/health", timeout_s=90)
        routers = {}
        for policy in ("cache_aware", "round_robin"):
            port = free_port()
            process = fleet.start_router(
                f"router-{policy}", port, free_port(), list(replicas), "--policy", policy
            )
            routers[policy] = (f"http://127.0.0.1:{port}", process)
        for url, process in routers.values():
            fleet.wait_ok(process, f"{url}/readiness", timeout_s=30)
        model = httpx.get(f"{routers['cache_aware'][0]}/v1/models", timeout=5).json()["data"][0]["id"]
        yield Cluster(
            fleet,
            {url: p.proc.pid for url, p in replicas.items()},
            routers["cache_aware"][0],
            routers["round_robin"][0],
            model,
        )
    finally:
        fleet.close()


def group_messages(group: int, repeat: int, seed_base: int) -> list[dict]:
    """Group `group`'s long instructions with a per-session line, then the group's image and question.

    The per-session line (a date, a user name: it differs on every repeat) ends the system prompt, so the
    prefix cache reuses the instructions' blocks but not the image's (which follow it), and the image's
    embeddings must come from the encoder cache: the run exercises both caches, as such traffic does.
    """
    instructions = f"Group {seed_base + group} assistant. " + " ".join(
        f"rule{seed_base + group}x{i}" for i in range(60)
    )
    system = f"{instructions} Session {repeat}."
    image = media.data_url(media.png(448, 448, seed=seed_base + group))
    user = [media.image_part(image, detail="low"), {"type": "text", "text": "What stands out here?"}]
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]


def cache_counters(replicas) -> dict[str, float]:
    totals = dict.fromkeys(CACHE_COUNTERS, 0.0)
    for url in replicas:
        samples = scrape(url)
        for name in CACHE_COUNTERS:
            totals[name] += samples[f"plm_{name}_total"]
    return totals


@dataclass
class Run:
    placements: dict[int, list[str]]  # group -> replica of each repeat, in order
    cached_tokens: dict[int, list[int]]
    prefix_hit_rate: float
    encoder_hit_rate: float
    encoder_queries: float


def measure(cluster: Cluster, router: str, seed_base: int) -> Run:
    """Round 0 arrives as one burst (the groups' first requests at once: how traffic spreads), then each
    round's requests one after another, group by group."""
    before = cache_counters(cluster.replicas)
    placements: dict[int, list[str]] = {g: [] for g in range(GROUPS)}
    cached: dict[int, list[int]] = {g: [] for g in range(GROUPS)}
    with httpx.Client(base_url=router, timeout=60) as client:

        def send(group: int, repeat: int) -> httpx.Response:
            body = {
                "model": cluster.model,
                "max_tokens": 1,
                "messages": group_messages(group, repeat, seed_base),
            }
            resp = client.post("/v1/chat/completions", json=body)
            assert resp.status_code == 200, resp.text
            return resp

        with ThreadPoolExecutor(GROUPS) as pool:
            burst = list(pool.map(lambda g: send(g, 0), range(GROUPS)))
        rounds = [burst, *([send(g, r) for g in range(GROUPS)] for r in range(1, REPEATS))]
        for responses in rounds:
            for group, resp in enumerate(responses):
                placements[group].append(resp.headers[ROUTED_WORKER_HEADER])
                cached[group].append(resp.json()["usage"]["prompt_tokens_details"]["cached_tokens"])
    after = cache_counters(cluster.replicas)
    delta = {name: after[name] - before[name] for name in CACHE_COUNTERS}
    return Run(
        placements,
        cached,
        delta["prefix_cache_hits"] / delta["prefix_cache_queries"],
        delta["encoder_cache_hits"] / delta["encoder_cache_queries"],
        delta["encoder_cache_queries"],
    )


@pytest.fixture(scope="module")
def runs(cluster) -> dict[str, Run]:
    """One run per policy, on disjoint groups (new prompts and images), so neither profits from the other."""
    measured = {
        "cache_aware": measure(cluster, cluster.cache_aware, seed_base=100),
        "round_robin": measure(cluster, cluster.round_robin, seed_base=200),
    }
    print(
        f"\n{GROUPS} groups x {REPEATS} requests | prefix-cache hit rate | encoder-cache hit rate | replicas"
    )
    for policy, run in measured.items():
        used = len({r for p in run.placements.values() for r in p})
        print(f"{policy:24} | {run.prefix_hit_rate:21.3f} | {run.encoder_hit_rate:22.3f} | {used}")
    return measured


def test_requests_spread_over_both_replicas(cluster, runs):
    for run in runs.values():
        assert {replica for placed in run.placements.values() for replica in placed} == set(cluster.replicas)


def test_repeats_land_on_the_replica_that_has_their_prompt_and_image_cached(runs):
    run = runs["cache_aware"]
    for group, placed in run.placements.items():
        assert len(set(placed)) == 1, f"group {group} moved: {placed}"
        first, *repeats = run.cached_tokens[group]
        assert first == 0 and min(repeats) > 0 and len(set(repeats)) == 1, run.cached_tokens[group]


def test_cache_aware_routing_beats_round_robin_on_the_measured_hit_rates(runs):
    aware, rr = runs["cache_aware"], runs["round_robin"]
    for group, placed in rr.placements.items():
        assert len(set(placed)) == 2, f"round-robin kept group {group} on one replica: the run shows nothing"
    # Each replica that sees a group pays its first request in full: 1 of 4 misses against 2 of 4.
    assert aware.prefix_hit_rate > 1.3 * rr.prefix_hit_rate
    # Exact, because the placements are: each group's image is encoded once per replica that sees it.
    assert aware.encoder_hit_rate == (REPEATS - 1) / REPEATS
    assert rr.encoder_hit_rate == (REPEATS - 2) / REPEATS


def test_a_request_id_is_followed_from_the_client_to_the_replica_log(cluster):
    resp = httpx.post(
        f"{cluster.cache_aware}/v1/chat/completions",
        json={"model": cluster.model, "messages": [{"role": "user", "content": "trace me"}], "max_tokens": 1},
        headers={"X-Request-Id": "trace-router-1"},
        timeout=30,
    )
    assert resp.status_code == 200 and resp.headers["x-request-id"] == "trace-router-1"
    replica = resp.headers[ROUTED_WORKER_HEADER]
    (process,) = [p for p in cluster.fleet.processes if p.proc.pid == cluster.replicas[replica]]
    lines = [json.loads(line) for line in process.log.read_text().splitlines() if line.startswith("{")]
    (access,) = [e for e in lines if e.get("request_id") == "trace-router-1"]
    assert (access["logger"], access["path"], access["status"]) == (
        "uvicorn.access",
        "/v1/chat/completions",
        200,
    )


def test_the_router_metrics_the_dashboard_reads_are_exported(cluster):
    """deploy/grafana/plm-serve.json's `smg_*` series exist on this router's /metrics, with those labels."""
    from prometheus_client.parser import text_string_to_metric_families

    dashboard = json.loads((DEPLOY / "grafana" / "plm-serve.json").read_text(encoding="utf-8"))
    exprs = [t["expr"] for p in dashboard["panels"] if p["type"] != "row" for t in p["targets"]]
    wanted = [ref for expr in exprs for ref in referenced_metrics(expr) if ref[0].startswith("smg_")]
    assert wanted
    (process,) = [p for p in cluster.fleet.processes if p.name == "router-cache_aware"]
    metrics_port = flag_values(process.proc.args)["--prometheus-port"][-1]
    text = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).text
    exported: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            exported.setdefault(sample.name, set()).update(sample.labels)
    for name, labels in wanted:
        assert name in exported, f"{name} is not on the router's /metrics"
        assert labels <= exported[name], (name, labels)
    for expr in exprs:
        names = [name for name, _ in referenced_metrics(expr)]
        if names and all(n.startswith("smg_") for n in names):
            assert grouping_labels(expr) <= set().union(*(exported[n] for n in names)), expr


def stream_until_done(router: str, body: dict, out: dict, started: threading.Event) -> None:
    events: list[str] = []
    out["events"] = events
    try:
        with httpx.stream("POST", f"{router}/v1/chat/completions", json=body, timeout=60) as resp:
            out["replica"] = resp.headers.get(ROUTED_WORKER_HEADER)
            for line in resp.iter_lines():
                if line.startswith("data: "):
                    events.append(line[6:])
                    if len(events) == 5:
                        started.set()
    except httpx.HTTPError as exc:
        out["error"] = repr(exc)
    finally:
        started.set()


def completed(events: list[str]) -> bool:
    """An OpenAI stream that ended properly: a `length` finish and `[DONE]`."""
    return bool(events) and events[-1] == "[DONE]" and '"finish_reason":"length"' in "".join(events)


def test_killing_a_replica_loses_only_its_running_requests(cluster):
    """Runs last in this module: it kills one of the replicas."""
    streams = [{} for _ in range(4)]
    started = [threading.Event() for _ in streams]
    threads = []
    for i, (out, event) in enumerate(zip(streams, started, strict=True)):
        body = {
            "model": cluster.model,
            "stream": True,
            "max_tokens": 400,
            "min_tokens": 400,
            "ignore_eos": True,
        }
        body["messages"] = [{"role": "user", "content": f"long story {i}: " + f"plot{i} " * 40}]
        threads.append(
            threading.Thread(target=stream_until_done, args=(cluster.cache_aware, body, out, event))
        )
    for t in threads:
        t.start()
    for event in started:
        assert event.wait(30)
    victim = streams[0]["replica"]
    survivor = next(url for url in cluster.replicas if url != victim)
    on_victim = [s for s in streams if s["replica"] == victim]
    on_survivor = [s for s in streams if s["replica"] == survivor]
    assert on_victim and on_survivor, [s.get("replica") for s in streams]
    assert scrape(victim)["plm_num_requests_running"] == len(on_victim)

    os.kill(cluster.replicas[victim], signal.SIGKILL)
    for t in threads:
        t.join(60)
    assert all(completed(s["events"]) for s in on_survivor), [s["events"][-2:] for s in on_survivor]
    assert not any(completed(s["events"]) for s in on_victim)

    # The router keeps serving: new requests, including the groups whose caches lived on the dead replica.
    with httpx.Client(base_url=cluster.cache_aware, timeout=60) as client:
        for group in range(GROUPS):
            body = {"model": cluster.model, "max_tokens": 1, "messages": group_messages(group, 9, 100)}
            resp = client.post("/v1/chat/completions", json=body)
            assert resp.status_code == 200, resp.text
            assert resp.headers[ROUTED_WORKER_HEADER] == survivor
