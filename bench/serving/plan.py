"""What a run measures: scenarios, requests per load point, the load points, warm-up, workload knobs.

A plan is a YAML file (shipped ones in `bench/serving/plans/`, named without `.yaml`) or built from CLI flags:

    defaults: {num_requests: 16, concurrency: [1, 4, 16], rate: [], warmup: 2, duration_s: 30, grace_s: 30}
    workload: {max_output_tokens: 64, media_output_tokens: 32}   # WorkloadOptions fields
    scenarios:
      text-chat: {num_requests: 48, rate: [2, 8]}                 # overrides of the defaults
      image-high: {concurrency: [1, 4]}
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import yaml

from bench.serving.load import LoadPoint
from bench.serving.workload import SCENARIOS, WorkloadOptions

PLANS_DIR = Path(__file__).parent / "plans"
DEFAULTS = {
    "num_requests": 32,
    "concurrency": [1, 4, 16],
    "rate": [],
    "warmup": 4,
    "duration_s": None,  # sending window per point
    "grace_s": 30.0,  # then how long running requests may still finish
}


@dataclass(frozen=True)
class ScenarioPlan:
    name: str
    num_requests: int
    points: tuple[LoadPoint, ...]
    warmup: int
    duration_s: float | None
    grace_s: float


@dataclass(frozen=True)
class Plan:
    scenarios: tuple[ScenarioPlan, ...]
    workload: WorkloadOptions
    seed: int = 0

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def shipped_plans() -> list[str]:
    return sorted(p.stem for p in PLANS_DIR.glob("*.yaml"))


def read_plan(name_or_path: str) -> dict:
    path = Path(name_or_path)
    if not path.is_file():
        path = PLANS_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        raise SystemExit(f"no plan file {name_or_path!r} (shipped plans: {', '.join(shipped_plans())})")
    data = yaml.safe_load(path.read_text()) or {}
    unknown = set(data) - {"defaults", "workload", "scenarios"}
    if unknown:
        raise SystemExit(f"{path}: unknown plan keys {sorted(unknown)}")
    return data


def build_plan(
    raw: dict,
    *,
    only: list[str] | None = None,
    overrides: dict | None = None,
    workload_overrides: dict | None = None,
    seed: int = 0,
) -> Plan:
    """The plan of `raw` (a plan file's mapping), restricted to `only` scenarios; flag `overrides` apply over
    every scenario's settings, `workload_overrides` over the plan's workload options."""
    defaults = {**DEFAULTS, **(raw.get("defaults") or {})}
    scenarios = raw.get("scenarios") or {}
    names = list(only or scenarios)
    for name in names:
        if name not in SCENARIOS:
            raise SystemExit(f"unknown scenario {name!r} (known: {', '.join(SCENARIOS)})")
    built = []
    for name in names:
        settings = {**defaults, **(scenarios.get(name) or {}), **(overrides or {})}
        unknown = set(settings) - set(DEFAULTS)
        if unknown:
            raise SystemExit(f"scenario {name}: unknown settings {sorted(unknown)}")
        points = [LoadPoint("concurrency", float(c)) for c in settings["concurrency"]]
        points += [LoadPoint("rate", float(r)) for r in settings["rate"]]
        if not points:
            raise SystemExit(f"scenario {name}: no load point (give concurrency and/or rate)")
        built.append(
            ScenarioPlan(
                name,
                int(settings["num_requests"]),
                tuple(points),
                int(settings["warmup"]),
                settings["duration_s"],
                float(settings["grace_s"]),
            )
        )
    try:
        workload = WorkloadOptions(**{**(raw.get("workload") or {}), **(workload_overrides or {})})
    except TypeError as exc:
        raise SystemExit(f"workload: {exc}") from None
    return Plan(tuple(built), workload, seed)
