"""deploy/kubernetes/ against Kubernetes' own OpenAPI schemas (kubernetes-validate ships them: no cluster, no
network), and the promises between the objects: selectors that select, probes and grace periods that fit the
server's drain, the router's discovery and flags, the autoscaler's metric end to end."""

from __future__ import annotations

import copy
import tomllib
from pathlib import Path

import kubernetes_validate
import pytest

from plm_serve.server import __main__ as cli
from tests.deploy.files import (
    DEPLOY,
    REPO,
    default_drain_seconds,
    dockerfile_instructions,
    flag_values,
    kubernetes_documents,
    launcher_flags,
    pinned_versions,
    routing_flags,
    server_metric_samples,
    stages,
    yaml_documents,
)

DOCS = kubernetes_documents()
# The oldest version still in wide use and the newest the package knows.
VERSIONS = ["1.29.0", kubernetes_validate.latest_version()]


def obj(kind: str, name: str) -> dict:
    (found,) = [d for d in DOCS if d["kind"] == kind and d["metadata"]["name"] == name]
    return found


REPLICAS = obj("Deployment", "plm-serve")
ROUTER = obj("Deployment", "plm-router")
(REPLICA,) = REPLICAS["spec"]["template"]["spec"]["containers"]
(SMG,) = ROUTER["spec"]["template"]["spec"]["containers"]
REPLICA_LABELS = REPLICAS["spec"]["template"]["metadata"]["labels"]


@pytest.mark.parametrize("version", VERSIONS)
def test_every_object_is_valid_against_the_kubernetes_schemas(version):
    kinds = {d["kind"] for d in DOCS}
    assert {"Deployment", "Service", "PodDisruptionBudget", "HorizontalPodAutoscaler"} <= kinds
    for doc in DOCS:
        # strict: unknown fields are errors; a kind without a schema (a CRD) raises, so nothing is skipped
        kubernetes_validate.validate(doc, version, strict=True)


def test_the_schemas_do_reject_a_misspelt_field():
    broken = copy.deepcopy(REPLICAS)
    broken["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["periodSecond"] = 5
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, VERSIONS[-1], strict=True)


def selects(selector: dict, labels: dict) -> bool:
    return selector.items() <= labels.items()


def test_selectors_select_the_pods_they_are_for():
    assert REPLICAS["spec"]["selector"]["matchLabels"] == REPLICA_LABELS
    assert selects(obj("Service", "plm-serve")["spec"]["selector"], REPLICA_LABELS)
    assert selects(obj("PodDisruptionBudget", "plm-serve")["spec"]["selector"]["matchLabels"], REPLICA_LABELS)
    router_labels = ROUTER["spec"]["template"]["metadata"]["labels"]
    assert selects(obj("Service", "plm-router")["spec"]["selector"], router_labels)
    assert not selects(obj("Service", "plm-serve")["spec"]["selector"], router_labels)


def probe_window(probe: dict) -> int:
    return probe["periodSeconds"] * probe["failureThreshold"]


def test_probes_read_health_and_fit_the_drain():
    http_port = {p["name"]: p["containerPort"] for p in REPLICA["ports"]}["http"]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert REPLICA[probe]["httpGet"] == {"path": "/health", "port": "http"}
    assert http_port == 8000  # the image's ENTRYPOINT port
    assert probe_window(REPLICA["startupProbe"]) >= 600  # large checkpoints load in minutes
    assert probe_window(REPLICA["readinessProbe"]) <= 10  # a draining replica leaves rotation quickly
    grace_period = REPLICAS["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert probe_window(REPLICA["livenessProbe"]) > grace_period  # liveness cannot kill a drain


def test_the_grace_period_covers_prestop_and_the_servers_drain():
    image_flags = ["--host", "0.0.0.0", "--port", "8000"]
    args = cli.build_parser().parse_args([*image_flags, *REPLICA["args"]])
    assert args.model.startswith("/models/")
    drain = args.shutdown_grace_seconds
    assert drain is not None and drain == default_drain_seconds()  # stated, and the default
    command = REPLICA["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    pre_stop = float(command[1])
    grace_period = REPLICAS["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    # preStop, then the drain, then uvicorn's 5 s backstop and the exit, before the kubelet's SIGKILL
    assert grace_period >= pre_stop + drain + 5 + 5


def test_each_replica_gets_one_gpu_and_the_models_read_only():
    for part in ("requests", "limits"):
        assert REPLICA["resources"][part]["nvidia.com/gpu"] == 1
    (mount,) = REPLICA["volumeMounts"]
    assert mount["mountPath"] == "/models" and mount["readOnly"] is True
    (volume,) = REPLICAS["spec"]["template"]["spec"]["volumes"]
    assert (
        volume["persistentVolumeClaim"]["claimName"]
        == obj("PersistentVolumeClaim", "plm-models")["metadata"]["name"]
    )


def test_the_pod_runs_as_the_images_user_and_the_images_version():
    runtime = dict(stages(dockerfile_instructions((REPO / "Dockerfile").read_text()))["runtime"])
    uid, _, gid = runtime["USER"].partition(":")
    security = REPLICAS["spec"]["template"]["spec"]["securityContext"]
    assert (security["runAsUser"], security["runAsGroup"], security["runAsNonRoot"]) == (
        int(uid),
        int(gid),
        True,
    )
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    assert REPLICA["image"].endswith(f"/plm-serve:{version}")


def test_prometheus_scrape_annotations_point_at_the_metrics_ports():
    replica_annotations = REPLICAS["spec"]["template"]["metadata"]["annotations"]
    assert replica_annotations["prometheus.io/scrape"] == "true"
    assert replica_annotations["prometheus.io/path"] == "/metrics"
    assert int(replica_annotations["prometheus.io/port"]) == REPLICA["ports"][0]["containerPort"]
    router_annotations = ROUTER["spec"]["template"]["metadata"]["annotations"]
    metrics_port = flag_values(SMG["args"])["--prometheus-port"][0]
    assert router_annotations["prometheus.io/port"] == metrics_port
    assert {"name": "metrics", "containerPort": int(metrics_port)} in SMG["ports"]


def test_the_router_discovers_the_replica_pods_with_the_launchers_flags():
    flags = flag_values(SMG["args"])
    assert routing_flags(flags) == routing_flags(launcher_flags())
    selector = dict(label.split("=") for label in flags["--selector"])
    assert selector == REPLICA_LABELS
    assert flags["--service-discovery-port"] == (str(REPLICA["ports"][0]["containerPort"]),)
    assert flags["--service-discovery-namespace"] == ("$(POD_NAMESPACE)",)
    (env,) = SMG["env"]
    assert env == {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}}
    assert SMG["image"] == f"docker.io/lightseekorg/smg:{pinned_versions()['smg']}"
    # it may watch pods, through the binding of the account it runs as
    account = ROUTER["spec"]["template"]["spec"]["serviceAccountName"]
    binding = obj("RoleBinding", "plm-router")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": account}]
    (rule,) = obj("Role", binding["roleRef"]["name"])["rules"]
    assert rule["resources"] == ["pods"] and {"list", "watch"} <= set(rule["verbs"])


def test_the_autoscaler_scales_on_the_exported_queue_depth_through_the_adapter():
    hpa = obj("HorizontalPodAutoscaler", "plm-serve")
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "plm-serve",
    }
    (metric,) = hpa["spec"]["metrics"]
    name = metric["pods"]["metric"]["name"]
    assert name in server_metric_samples() and server_metric_samples()[name] == set()  # a per-replica gauge
    assert hpa["spec"]["minReplicas"] >= 2  # so the PodDisruptionBudget always leaves one serving
    (adapter,) = yaml_documents(DEPLOY / "prometheus" / "adapter-rules.yaml")
    (rule,) = adapter["rules"]["custom"]
    assert rule["name"]["as"] == name and rule["seriesQuery"].startswith(f"{name}{{")
    # the labels the adapter maps to pods are the ones the scrape job writes
    (scrape,) = yaml_documents(DEPLOY / "prometheus" / "kubernetes-scrape.yaml")
    (job,) = scrape["scrape_configs"]
    written = {r["target_label"] for r in job["relabel_configs"] if "target_label" in r}
    assert set(rule["resources"]["overrides"]) <= written


def test_kubectl_apply_of_the_folder_applies_only_kubernetes_objects():
    for path in sorted(Path(DEPLOY / "kubernetes").iterdir()):
        assert path.suffix == ".yaml", path
        assert all({"apiVersion", "kind", "metadata"} <= set(doc) for doc in yaml_documents(path)), path
