"""Reading the deployment files: Dockerfile instructions, .dockerignore, YAML documents, pinned versions."""

from __future__ import annotations

import fnmatch
import re
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(KEYWORD, arguments) per instruction, with backslash continuations joined and comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        keyword, _, args = (pending + line).partition(" ")
        instructions.append((keyword.upper(), " ".join(args.split())))
        pending = ""
    return instructions


def stages(instructions: list[tuple[str, str]]) -> dict[str, list[tuple[str, str]]]:
    """Instructions per build stage, keyed by the stage's `AS` name (the global ARGs before the first FROM
    under "")."""
    out: dict[str, list[tuple[str, str]]] = {"": []}
    current = ""
    for keyword, args in instructions:
        if keyword == "FROM":
            current = args.split(" AS ")[-1] if " AS " in args else args
            out[current] = []
        out[current].append((keyword, args))
    return out


def dockerignore_keeps(patterns: list[str], path: str) -> bool:
    """Whether `path` (relative, '/'-separated) is in the build context: Docker's rule that the last matching
    pattern wins, a `!` pattern re-includes, and a pattern matching a directory covers everything below it."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    kept = True
    for pattern in patterns:
        negated = pattern.startswith("!")
        body = pattern.lstrip("!").strip("/")
        alternatives = [body, body[3:]] if body.startswith("**/") else [body]
        if any(fnmatch.fnmatchcase(p, alt) for p in prefixes for alt in alternatives):
            kept = negated
    return kept


def dockerignore_patterns() -> list[str]:
    lines = (REPO / ".dockerignore").read_text(encoding="utf-8").splitlines()
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


def yaml_documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")) if doc is not None]


def kubernetes_documents() -> list[dict[str, Any]]:
    """Every object under deploy/kubernetes/, in file order."""
    return [doc for path in sorted((DEPLOY / "kubernetes").glob("*.yaml")) for doc in yaml_documents(path)]


def pinned_versions() -> dict[str, str]:
    """requirements/constraints.txt as {normalized name: version}."""
    pins = {}
    for line in (REPO / "requirements" / "constraints.txt").read_text(encoding="utf-8").splitlines():
        if "==" in line and not line.startswith("#"):
            name, version = line.split("==")
            pins[normalize(name)] = version.strip()
    return pins


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def server_metric_samples() -> dict[str, set[str]]:
    """{sample name: label names} of everything plm-serve's /metrics exports (labelled families observed
    once so they show), rendered by the server's own ServerMetrics over a FakeEngine."""
    from prometheus_client.parser import text_string_to_metric_families

    from plm_serve.server.metrics import ServerMetrics
    from tests.server.fake_engine import FakeEngine

    metrics = ServerMetrics(lambda: FakeEngine())
    metrics.http_requests.labels("/v1/chat/completions", "200").inc()
    metrics.request_success.labels("stop").inc()
    samples: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(metrics.render().decode()):
        for sample in family.samples:
            samples.setdefault(sample.name, set()).update(sample.labels)
    return samples


METRIC_SELECTOR = re.compile(r"\b((?:plm|smg)_[a-z0-9_]+)(\{[^}]*\})?")


def referenced_metrics(expr: str) -> list[tuple[str, set[str]]]:
    """(metric name, label names in its selector) for each metric a PromQL expression reads."""
    found = []
    for match in METRIC_SELECTOR.finditer(expr):
        labels = set(re.findall(r"([a-z_]+)\s*(?:=~|!~|!=|=)", match[2] or ""))
        found.append((match[1], labels))
    return found


def flag_values(tokens: list[str]) -> dict[str, tuple[str, ...]]:
    """`--flag v1 v2 --switch` -> {"--flag": ("v1", "v2"), "--switch": ()}; a repeated flag keeps the last."""
    flags: dict[str, tuple[str, ...]] = {}
    current = None
    for token in tokens:
        if token.startswith("--"):
            current = token
            flags[current] = ()
        elif current is not None:
            flags[current] = (*flags[current], token)
    return flags


def launcher_flags() -> dict[str, tuple[str, ...]]:
    """The flags deploy/router/smg-launch.sh gives `smg launch` (before the caller's)."""
    import shlex

    text = (DEPLOY / "router" / "smg-launch.sh").read_text(encoding="utf-8")
    command = text[text.index("exec smg launch") :].replace("\\\n", " ")
    tokens = shlex.split(command)[3:]
    assert tokens[-1] == "$@"
    return flag_values(tokens[:-1])


# Where each deployment puts the router and finds the replicas: these flags differ by design.
PLACEMENT_FLAGS = {
    "--host",
    "--port",
    "--worker-urls",
    "--service-discovery",
    "--selector",
    "--service-discovery-port",
    "--service-discovery-namespace",
}


def routing_flags(flags: dict[str, tuple[str, ...]]) -> dict[str, tuple[str, ...]]:
    return {flag: values for flag, values in flags.items() if flag not in PLACEMENT_FLAGS}


def grouping_labels(expr: str) -> set[str]:
    """Label names of `by (...)` clauses."""
    return {label.strip() for group in re.findall(r"\bby \(([^)]*)\)", expr) for label in group.split(",")}


def default_drain_seconds() -> float:
    """ServerConfig's default --shutdown-grace-seconds (a slots dataclass: read it from its fields)."""
    import dataclasses

    from plm_serve.server.config import ServerConfig

    (field,) = [f for f in dataclasses.fields(ServerConfig) if f.name == "shutdown_grace_seconds"]
    return field.default
