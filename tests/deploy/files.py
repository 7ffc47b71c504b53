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
