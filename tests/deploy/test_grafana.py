"""deploy/grafana/plm-serve.json reads only metrics the server exports, with the labels they carry, and covers
what an operator watches: throughput, TTFT/ITL percentiles, queue, KV usage, cache hit rates, errors. (The
router's `smg_*` names are checked against a live router in test_router.py.)"""

from __future__ import annotations

import json

from tests.deploy.files import (
    DEPLOY,
    grouping_labels,
    referenced_metrics,
    server_metric_samples,
    yaml_documents,
)

DASHBOARD = json.loads((DEPLOY / "grafana" / "plm-serve.json").read_text(encoding="utf-8"))
PANELS = [p for p in DASHBOARD["panels"] if p["type"] != "row"]
EXPRS = [t["expr"] for p in PANELS for t in p["targets"]]
# Labels Prometheus adds at scrape time, not the server.
SCRAPE_LABELS = {"instance", "job", "le"}


def dashboard_metrics() -> list[tuple[str, set[str]]]:
    return [ref for expr in EXPRS for ref in referenced_metrics(expr)]


def test_every_server_metric_and_label_the_dashboard_reads_is_exported():
    exported = server_metric_samples()
    for name, labels in dashboard_metrics():
        if name.startswith("plm_"):
            assert name in exported, f"{name} is not on /metrics"
            assert labels - SCRAPE_LABELS <= exported[name], f"{name}{{{labels}}}: unknown label"
    for expr in EXPRS:
        names = [name for name, _ in referenced_metrics(expr)]
        if names and all(n.startswith("plm_") for n in names):
            carried = set().union(*(exported[n] for n in names)) | SCRAPE_LABELS
            assert grouping_labels(expr) <= carried, expr


def test_it_covers_throughput_latency_percentiles_queue_kv_caches_and_errors():
    read = {name for name, _ in dashboard_metrics()}
    assert {
        "plm_generation_tokens_total",
        "plm_prompt_tokens_total",
        "plm_time_to_first_token_seconds_bucket",
        "plm_time_per_output_token_seconds_bucket",
        "plm_num_requests_waiting",
        "plm_num_requests_running",
        "plm_kv_cache_usage_perc",
        "plm_prefix_cache_hits_total",
        "plm_prefix_cache_queries_total",
        "plm_encoder_cache_hits_total",
        "plm_encoder_cache_queries_total",
        "plm_internal_errors_total",
    } <= read
    assert any('status=~"5.."' in e for e in EXPRS)
    for quantile in ("0.5", "0.9", "0.99"):
        assert any(f"histogram_quantile({quantile}, " in e and "time_to_first_token" in e for e in EXPRS)
        assert any(f"histogram_quantile({quantile}, " in e and "time_per_output_token" in e for e in EXPRS)


def test_panels_are_well_formed_and_use_the_datasource_variable():
    ids = [p["id"] for p in DASHBOARD["panels"]]
    assert len(ids) == len(set(ids))
    variables = {v["name"] for v in DASHBOARD["templating"]["list"]}
    assert variables == {"datasource", "instance"}
    for panel in PANELS:
        assert panel["title"] and panel["description"] and panel["targets"]
        assert panel["datasource"]["uid"] == "${datasource}"
        assert all(t["datasource"]["uid"] == "${datasource}" for t in panel["targets"])
        assert all('instance=~"$instance"' in t["expr"] for t in panel["targets"] if "plm_" in t["expr"])
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24


def test_compose_provisions_this_dashboard_from_its_prometheus():
    (provider,) = yaml_documents(DEPLOY / "grafana" / "provisioning" / "dashboards" / "plm-serve.yml")
    (datasources,) = yaml_documents(DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml")
    (compose,) = yaml_documents(DEPLOY / "docker-compose.yml")
    mounts = compose["services"]["grafana"]["volumes"]
    folder = provider["providers"][0]["options"]["path"]
    assert f"./grafana/plm-serve.json:{folder}/plm-serve.json:ro" in mounts
    (source,) = datasources["datasources"]
    assert source["url"] == "http://prometheus:9090" and "prometheus" in compose["services"]
