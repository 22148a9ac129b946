"""Wan2.2 expert plans (schema 3.1): one file, a complete plan per expert, and the boundary."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path

from ditplan.policy.plan import (
    COMPUTE,
    EXPERTS,
    PLAN_SCHEMA_VERSION,
    RECOMPILE,
    AttentionSpec,
    Plan,
    PlanError,
    Workload,
)
from ditplan.policy.plan_io import (
    checked_expert_file,
    normalize_plan,
    parse_plan_json,
    plan_from_dict,
    plan_to_dict,
    plan_to_json,
    read_plan_text,
    save_plan,
    write_plan_text,
)


@dataclass(frozen=True)
class ExpertPlans:
    """A plan per expert of a two-expert pipeline, switched at ``boundary_ratio``.

    Each section is a complete plan whose ``workload.step_range`` says which steps its expert
    runs; the ranges tile the steps in order, and every section records its weights hash (the
    experts share class and config, so only the weights tell them apart).
    """

    experts: dict[str, Plan]
    boundary_ratio: float
    schema_version: str = PLAN_SCHEMA_VERSION

    def __post_init__(self):
        if tuple(self.experts) != EXPERTS:
            raise PlanError(f"experts: sections {list(self.experts)}, expected {list(EXPERTS)} "
                            f"in that order; {RECOMPILE}")
        if not 0.0 < self.boundary_ratio < 1.0:
            raise PlanError(f"boundary_ratio: {self.boundary_ratio} is not in (0, 1)")
        stop = 0
        for name, plan in self.experts.items():
            if not plan.identity.weights_hash:
                raise PlanError(f"experts.{name}.identity.weights_hash: required in an expert "
                                f"section (else swapped experts pass unnoticed); {RECOMPILE}")
            step_range = plan.workload.step_range
            if step_range is None or step_range[0] != stop:
                raise PlanError(f"experts.{name}.workload.step_range: {step_range} must start "
                                f"at step {stop}, where the previous expert stops; {RECOMPILE}")
            stop = step_range[1]
        steps = {p.workload.steps for p in self.experts.values()}
        if steps != {stop}:
            raise PlanError(f"experts: step ranges end at {stop}, workload steps are "
                            f"{sorted(steps)}; {RECOMPILE}")
        shared = {dataclasses.replace(p.workload, step_range=None)
                  for p in self.experts.values()}
        if len(shared) != 1:
            raise PlanError(f"experts: the sections were compiled for different workloads "
                            f"(one generation runs both); {RECOMPILE}")

    @property
    def workload(self) -> Workload:
        """The generation both experts run (their sections' workload without a step range)."""
        return dataclasses.replace(self.experts[EXPERTS[0]].workload, step_range=None)


def experts_to_json(plans: ExpertPlans) -> str:
    """The canonical JSON text of ``plans`` (each section as ``plan_to_json`` writes it)."""
    data = {"boundary_ratio": float(f"{plans.boundary_ratio:.6g}"),
            "experts": {n: plan_to_dict(p) for n, p in plans.experts.items()},
            "schema_version": plans.schema_version}
    return json.dumps(data, sort_keys=True, indent=2, allow_nan=False) + "\n"


def execution_dict(plans: Plan | ExpertPlans) -> dict:
    """What a plan file runs, as JSON values: its canonical content without the provenance
    (expert plans: without any section's), so two compiles that give the same plan give equal
    dicts."""
    if isinstance(plans, Plan):
        data = json.loads(plan_to_json(plans))
        data.pop("provenance")
        return _without_unset_estimates(data)
    data = json.loads(experts_to_json(plans))
    for section in data["experts"].values():
        section.pop("provenance")
        _without_unset_estimates(section)
    return data


def _without_unset_estimates(value):
    """Drops every ``estimate_heads: null`` (AttentionSpec, schema 3.5), so a plan that
    estimates nothing keeps the execution dict (and calibration keys) it had before 3.5."""
    if isinstance(value, dict):
        if value.get("estimate_heads", 0) is None:
            del value["estimate_heads"]
        for item in value.values():
            _without_unset_estimates(item)
    elif isinstance(value, list):
        for item in value:
            _without_unset_estimates(item)
    return value


def save_any_plan(plans: Plan | ExpertPlans, path: str | os.PathLike) -> Path:
    """Write a plan or expert plans as canonical JSON atomically; the written path."""
    if isinstance(plans, Plan):
        return save_plan(plans, path)
    return write_plan_text(path, experts_to_json(plans))


def load_any_plan(path: str | os.PathLike) -> Plan | ExpertPlans:
    """Read a plan file: an :class:`ExpertPlans` when it has ``experts``, else a Plan (any
    version ``load_plan`` reads)."""
    path = Path(path)
    text = read_plan_text(path)
    try:
        data = parse_plan_json(text)
        if not (isinstance(data, dict) and "experts" in data):
            return plan_from_dict(data)
        return experts_from_dict(data)
    except PlanError as exc:
        raise PlanError(f"{path}: {exc}") from exc


def experts_from_dict(data) -> ExpertPlans:
    """Build :class:`ExpertPlans` from decoded JSON: the file's version policy and JSON Schema
    (plan_io), then each section as a plan, then the sections' agreement."""
    data = checked_expert_file(data)
    plans = {}
    for name, section in data["experts"].items():
        try:
            plans[name] = plan_from_dict(section)
        except PlanError as exc:
            raise PlanError(f"experts.{name}: {exc}") from exc
    return ExpertPlans(plans, float(data["boundary_ratio"]))


def lift_section(local: Plan, start: int, steps: int,
                 sigmas: tuple[float, ...] | None) -> Plan:
    """An expert's section from the plan compiled on its own steps alone (numbered from 0).

    Args:
        local: the plan ``compile_policy`` made from the expert's traces (its steps only).
        start: the generation step the expert's first step is.
        steps: the generation's steps (both experts').
        sigmas: the scheduler's sigma at each of ``steps`` steps, or None.
    Returns:
        the plan with ``workload.step_range = [start, start + local steps)``, dense steps moved
        by ``start`` and schedules padded with "C" outside the range (never read there).
    """
    count = local.workload.steps
    before, after = COMPUTE * start, COMPUTE * (steps - start - count)
    runs = tuple(dataclasses.replace(run, schedule={c: before + a + after
                                                    for c, a in run.schedule.items()})
                 for run in local.runs)
    layers = {b: dataclasses.replace(lp, attention=_shifted(lp.attention, start))
              for b, lp in local.layers.items()}
    defaults = dataclasses.replace(local.defaults,
                                   attention=_shifted(local.defaults.attention, start))
    workload = dataclasses.replace(local.workload, steps=steps, sigmas=sigmas,
                                   step_range=(start, start + count))
    return normalize_plan(dataclasses.replace(local, workload=workload, layers=layers,
                                              defaults=defaults, runs=runs))


def _shifted(spec: AttentionSpec, start: int) -> AttentionSpec:
    return dataclasses.replace(spec, dense_steps=tuple(s + start for s in spec.dense_steps))
