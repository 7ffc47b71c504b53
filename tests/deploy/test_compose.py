"""deploy/docker-compose.yml against the Compose specification's schema, and what it must say: a GPU per
replica, the model folder mounted read-only, a stop grace that covers the drain, the router's flags equal to
deploy/router/smg-launch.sh's, and a Prometheus that scrapes every replica and the router."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from plm_serve.server import __main__ as cli
from tests.deploy.files import (
    DEPLOY,
    REPO,
    default_drain_seconds,
    flag_values,
    launcher_flags,
    pinned_versions,
    routing_flags,
    yaml_documents,
)

COMPOSE_FILE = DEPLOY / "docker-compose.yml"
(COMPOSE,) = yaml_documents(COMPOSE_FILE)
SERVICES = COMPOSE["services"]
REPLICAS = {name: s for name, s in SERVICES.items() if s.get("image") == "plm-serve:local"}
CHECK_JSONSCHEMA = Path(sys.executable).parent / "check-jsonschema"


def validate(path: Path) -> subprocess.CompletedProcess:
    argv = [str(CHECK_JSONSCHEMA), "--builtin-schema", "vendor.compose-spec", str(path)]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60)


def test_valid_against_the_compose_specification(tmp_path):
    assert validate(COMPOSE_FILE).returncode == 0
    broken = tmp_path / "docker-compose.yml"
    broken.write_text(COMPOSE_FILE.read_text().replace("stop_grace_period:", "stop_grace_seconds:"))
    result = validate(broken)
    assert result.returncode == 1 and "stop_grace_seconds" in result.stdout  # the schema is strict


def seconds(duration: str) -> float:
    units = {"s": 1, "m": 60}
    return float(duration[:-1]) * units[duration[-1]]


def test_each_replica_reserves_its_own_gpu_and_mounts_the_models_read_only():
    assert set(REPLICAS) == {"plm-serve", "plm-serve-2"}
    gpus = []
    for service in REPLICAS.values():
        (device,) = service["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
        gpus += device["device_ids"]
        (volume,) = service["volumes"]
        assert volume.endswith(":/models:ro") and volume.startswith("${PLM_MODELS_DIR:?")
        assert service["build"] == {"context": "..", "dockerfile": "Dockerfile"}
    assert len(gpus) == len(set(gpus)) == 2
    assert (COMPOSE_FILE.parent / ".." / "Dockerfile").resolve() == REPO / "Dockerfile"


def test_the_replica_command_is_valid_and_the_stop_grace_covers_the_drain():
    for service in REPLICAS.values():
        args = cli.build_parser().parse_args(service["command"])
        assert args.model.startswith("/models/") and args.log_format == "json"
        grace = float(args.shutdown_grace_seconds or default_drain_seconds())
        # drain + uvicorn's 5 s backstop + time to exit, before Docker's SIGKILL
        assert seconds(service["stop_grace_period"]) >= grace + 5 + 5


def test_the_router_runs_the_pinned_smg_with_the_launchers_routing_flags():
    router = SERVICES["router"]
    assert router["image"] == f"docker.io/lightseekorg/smg:{pinned_versions()['smg']}"
    flags = flag_values(router["command"])
    assert routing_flags(flags) == routing_flags(launcher_flags())
    assert flags["--worker-urls"] == tuple(f"http://{name}:8000" for name in REPLICAS)
    assert set(router["profiles"]) == set(SERVICES["plm-serve-2"]["profiles"]) == {"scale-out"}


def test_prometheus_scrapes_every_replica_and_the_router():
    volumes = SERVICES["prometheus"]["volumes"]
    assert "./prometheus/prometheus.yml:/etc/prometheus/prometheus.yml:ro" in volumes
    (config,) = yaml_documents(DEPLOY / "prometheus" / "prometheus.yml")
    targets = {t for job in config["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]}
    metrics_port = launcher_flags()["--prometheus-port"][0]
    assert targets == {f"{name}:8000" for name in REPLICAS} | {f"router:{metrics_port}"}
    assert all(job["metrics_path"] == "/metrics" for job in config["scrape_configs"])
