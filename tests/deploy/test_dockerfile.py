"""The Dockerfile and its build context, checked without a Docker engine (none runs on CI): hadolint finds
nothing, the instructions say what docs/deployment.md promises, the context holds exactly the package, that
context builds the project, and the versions the image installs are the ones this environment tests."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import zipfile
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement

from plm_serve.server import __main__ as cli
from tests.deploy.files import (
    REPO,
    dockerfile_instructions,
    dockerignore_keeps,
    dockerignore_patterns,
    normalize,
    pinned_versions,
    stages,
)

DOCKERFILE = (REPO / "Dockerfile").read_text(encoding="utf-8")
INSTRUCTIONS = dockerfile_instructions(DOCKERFILE)
STAGES = stages(INSTRUCTIONS)
HADOLINT = Path(sys.executable).parent / "hadolint"


def test_hadolint_finds_nothing_at_any_severity(tmp_path):
    # An empty HOME/XDG_CONFIG_HOME and cwd: no user config may relax the rules.
    env = {**os.environ, "HOME": str(tmp_path), "XDG_CONFIG_HOME": str(tmp_path)}
    out = subprocess.run(
        [str(HADOLINT), "--format", "json", "--failure-threshold", "style", str(REPO / "Dockerfile")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert json.loads(out.stdout) == [], out.stdout
    assert out.returncode == 0


def test_hadolint_does_lint_this_file():
    """Without its inline pragmas the Dockerfile does draw findings: the linter runs and the pragmas matter."""
    stripped = "\n".join(line for line in DOCKERFILE.splitlines() if "hadolint ignore" not in line)
    out = subprocess.run(
        [str(HADOLINT), "--format", "json", "-"], input=stripped, capture_output=True, text=True, timeout=60
    )
    assert {finding["code"] for finding in json.loads(out.stdout)} == {"DL3008"}


def test_every_ignore_pragma_is_justified_just_above_it():
    lines = DOCKERFILE.splitlines()
    pragmas = [i for i, line in enumerate(lines) if line.startswith("# hadolint ignore=")]
    assert pragmas, "expected the apt pins' pragmas"
    for i in pragmas:
        above = lines[i - 1]
        assert above.startswith("# ") and "hadolint" not in above and len(above) > 40, lines[i]


def test_two_stages_on_cuda_and_the_runtime_installs_nothing_with_pip():
    froms = [args for keyword, args in INSTRUCTIONS if keyword == "FROM"]
    assert [f.split(" AS ")[-1] for f in froms] == ["builder", "runtime"]
    assert all(f.startswith("nvidia/cuda:${CUDA_VERSION}-") for f in froms)
    runtime = STAGES["runtime"]
    assert not any("pip" in args.split() for keyword, args in runtime if keyword == "RUN")
    assert ("COPY", "--from=builder /opt/venv /opt/venv") in runtime


def test_dependencies_come_from_the_pinned_constraints_and_llama_models_is_a_normal_one():
    builder_runs = [args for keyword, args in STAGES["builder"] if keyword == "RUN"]
    (deps,) = [run for run in builder_runs if "-r /tmp/requirements.txt" in run]
    assert "-c requirements/constraints.txt" in deps and "--only-binary=:all:" in deps
    assert "--target" not in DOCKERFILE and "llama-models" not in DOCKERFILE
    assert any("--no-deps --no-build-isolation ." in run for run in builder_runs)


def test_flash_attn_is_an_opt_in_build_argument():
    args = dict(a.partition("=")[::2] for keyword, a in STAGES["builder"] if keyword == "ARG")
    assert args["FLASH_ATTN_VERSION"] == '""'
    (run,) = [a for keyword, a in STAGES["builder"] if keyword == "RUN" and "flash-attn" in a]
    assert run.startswith('if [ -n "${FLASH_ATTN_VERSION}" ]')


def test_runtime_user_volume_port_healthcheck_and_entrypoint_agree():
    runtime = dict(STAGES["runtime"])  # the last of each keyword
    uid, _, gid = runtime["USER"].partition(":")
    assert uid.isdigit() and int(uid) > 0 and gid.isdigit()  # numeric, so runAsNonRoot can verify it
    (setup,) = [a for keyword, a in STAGES["runtime"] if keyword == "RUN" and "useradd" in a]
    assert f"groupadd --gid {gid} " in setup and f"useradd --uid {uid} --gid {gid} " in setup
    assert json.loads(runtime["VOLUME"]) == ["/models"]
    assert runtime["EXPOSE"] == "8000"
    entrypoint = json.loads(runtime["ENTRYPOINT"])
    assert entrypoint[0] == "plm-serve" and json.loads(runtime["CMD"]) == []
    flags = cli.build_parser().parse_args([*entrypoint[1:], "--model", "/models/x"])
    assert (flags.host, flags.port) == ("0.0.0.0", 8000)
    check = runtime["HEALTHCHECK"]
    assert "--start-period=" in check
    assert f"http://127.0.0.1:{flags.port}/health" in check


def test_the_build_context_is_the_package_and_nothing_else():
    patterns = dockerignore_patterns()
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True)
    kept = {path for path in tracked.stdout.split() if dockerignore_keeps(patterns, path)}
    copied = [
        shlex.split(args)[:-1]
        for keyword, args in STAGES["builder"]
        if keyword == "COPY" and not args.startswith("--from")
    ]
    sources = [source.rstrip("/") for group in copied for source in group]
    for path in kept:
        assert any(path == s or path.startswith(s + "/") for s in sources), f"{path} is sent but never copied"
    for source in sources:
        assert any(p == source or p.startswith(source + "/") for p in kept), f"{source} is excluded"
    for unwanted in (".git/config", ".venv/bin/python", "tests/conftest.py", "server/__pycache__/app.pyc"):
        assert not dockerignore_keeps(patterns, unwanted)


def test_the_build_context_builds_a_wheel_with_every_module_and_data_file(tmp_path):
    """What the builder stage runs (`pip install --no-deps --no-build-isolation .`) on what .dockerignore
    lets through, as a wheel: every package file is in it, so no COPY line or package-data entry is missing."""
    patterns = dockerignore_patterns()
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True)
    context = tmp_path / "context"
    for path in tracked.stdout.split():
        if dockerignore_keeps(patterns, path):
            (context / path).parent.mkdir(parents=True, exist_ok=True)
            (context / path).write_bytes((REPO / path).read_bytes())
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            tmp_path,
            context,
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    (wheel,) = tmp_path.glob("plm_serve-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    packages = ("server", "offline", "engine", "models", "processors", "configs")
    expected = {f"plm_serve/{p}" for p in tracked.stdout.split() if p.split("/")[0] in packages}
    assert expected <= names, sorted(expected - names)


def runtime_closure(root: str) -> dict[str, str]:
    """{name: installed version} of `root` and everything it requires at run time here (markers and extras
    evaluated): what the image's `pip install -r` of the same requirements resolves to."""
    seen: dict[str, str] = {}
    visited: set[tuple[str, frozenset[str]]] = set()
    todo = [(normalize(root), frozenset[str]())]
    while todo:
        name, extras = todo.pop()
        if (name, extras) in visited:
            continue
        visited.add((name, extras))
        dist = metadata.distribution(name)
        seen[name] = dist.version
        for line in dist.requires or []:
            req = Requirement(line)
            if any(req.marker is None or req.marker.evaluate({"extra": e}) for e in {"", *extras}):
                todo.append((normalize(req.name), frozenset(req.extras)))
    seen.pop(normalize(root))
    return seen


def test_the_image_installs_exactly_the_versions_this_environment_tests():
    pins = pinned_versions()
    closure = runtime_closure("plm-serve")
    assert {"torch", "llama-models", "setuptools", "fastapi"} <= set(closure)
    unpinned = sorted(name for name in closure if name not in pins)
    assert not unpinned, f"runtime dependencies missing from requirements/constraints.txt: {unpinned}"
    # Local labels (a `+cu130` build of a mirror) compare equal, as they do for pip's `==`.
    drift = {n: (v, pins[n]) for n, v in closure.items() if v.split("+")[0] != pins[n]}
    assert not drift, f"installed vs pinned: {drift}"
