"""Wan2.2 expert plan files: sections lifted to their steps, the JSON Schema, version policy."""

from __future__ import annotations

import dataclasses
import json

import jsonschema
import pytest

from ditplan.policy import plan_io, plan_schema
from ditplan.policy.experts import (
    ExpertPlans,
    experts_to_json,
    lift_section,
    load_any_plan,
    save_any_plan,
)
from ditplan.policy.plan import PlanError, Workload
from tests.policy.policy_factories import sample_plan

SIGMAS = (1.0, 0.9, 0.7, 0.5, 0.3, 0.1)


def _local(steps: int, weights: str, sigmas):
    plan = sample_plan(steps=steps)
    identity = dataclasses.replace(plan.identity, weights_hash=weights)
    workload = dataclasses.replace(plan.workload, sigmas=sigmas)
    return dataclasses.replace(plan, identity=identity, workload=workload)


def expert_plans() -> ExpertPlans:
    """6 steps: transformer runs 0-1 (a 2-step local plan), transformer_2 runs 2-5."""
    first = lift_section(_local(2, "w-high", SIGMAS[:2]), 0, 6, SIGMAS)
    second = lift_section(_local(4, "w-low", SIGMAS[2:]), 2, 6, SIGMAS)
    return ExpertPlans({"transformer": first, "transformer_2": second}, 0.875)


def test_lift_places_the_local_plan_at_the_experts_steps():
    local = _local(4, "w-low", SIGMAS[2:])
    section = lift_section(local, 2, 6, SIGMAS)
    assert section.workload.step_range == (2, 6) and section.workload.steps == 6
    assert section.workload.sigmas == SIGMAS
    assert section.runs[0].schedule["cond"] == "CC" + local.runs[0].schedule["cond"]
    assert section.layers["blocks.0"].attention.dense_steps == (2, 3)  # local warm-up 0, 1
    assert section.identity == local.identity and section.provenance == local.provenance


def test_expert_file_matches_the_committed_schema():
    schema = json.loads(plan_schema.SCHEMA_PATH.read_text())
    expert = {"$ref": f"#/$defs/{plan_schema.EXPERT_PLANS}"}
    validator = jsonschema.Draft202012Validator(schema).evolve(schema=expert)
    data = json.loads(experts_to_json(expert_plans()))
    validator.validate(data)
    with pytest.raises(jsonschema.ValidationError):
        validator.validate(data["experts"]["transformer"])  # a plan is not an expert file
    with pytest.raises(jsonschema.ValidationError):  # sections are validated as plans
        validator.validate({**data, "experts": {**data["experts"], "transformer": {}}})


def test_round_trip_and_newer_minor(tmp_path):
    plans = expert_plans()
    path = save_any_plan(plans, tmp_path / "wan22.json")
    assert load_any_plan(path) == plans
    data = json.loads(path.read_text())
    data.update(schema_version="3.9", future_top_level=1)
    data["experts"]["transformer_2"].update(schema_version="3.9", future_field={"x": 1})
    path.write_text(json.dumps(data))
    read = load_any_plan(path).experts["transformer_2"]
    assert read == dataclasses.replace(plans.experts["transformer_2"], schema_version="3.9")


@pytest.mark.parametrize("edit, message", [
    (lambda d: d.update(schema_version="4.0"), "newer ditplan .* upgrade ditplan"),
    (lambda d: d.update(schema_version="2.0"), "old plan format"),
    (lambda d: d.update(boundary_ratio=1.5), "boundary_ratio: 1.5 is greater than"),
    (lambda d: d.update(extra=1), "Additional properties"),
    (lambda d: d["experts"].update(transformer_3=d["experts"]["transformer"]),
     "Additional properties"),
    (lambda d: d["experts"]["transformer"]["workload"].update(step_range=[0, 3]),
     "must start at step 3"),
    (lambda d: d["experts"]["transformer"]["workload"].update(height=64),
     "different workloads"),
    (lambda d: d["experts"]["transformer_2"]["identity"].update(weights_hash=None),
     "weights_hash: required"),
])
def test_bad_expert_files_refused(tmp_path, edit, message):
    data = json.loads(experts_to_json(expert_plans()))
    edit(data)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    with pytest.raises(PlanError, match=message):
        load_any_plan(path)


def test_a_plan_reader_names_the_expert_reader(tmp_path):
    path = save_any_plan(expert_plans(), tmp_path / "wan22.json")
    with pytest.raises(PlanError, match="section per expert; read it with .*load_any_plan"):
        plan_io.load_plan(path)


def test_shared_workload_has_no_step_range():
    workload = expert_plans().workload
    assert isinstance(workload, Workload) and workload.step_range is None
    assert workload.steps == 6
