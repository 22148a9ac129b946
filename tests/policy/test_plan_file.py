"""The plan contract: canonical JSON round trip, committed JSON Schema, errors, runtime lookups."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import jsonschema
import pytest

from ditplan.policy import plan_io, plan_schema
from ditplan.policy.plan import PLAN_SCHEMA_VERSION, AttentionSpec, BlockRun, PlanError
from tests.policy.policy_factories import sample_plan


def write_json(path, data) -> str:
    path.write_text(json.dumps(data))
    return str(path)


def valid_dict() -> dict:
    return plan_io.plan_to_dict(sample_plan())


def test_round_trip_is_byte_identical(tmp_path):
    plan = sample_plan()
    first = plan_io.save_plan(plan, tmp_path / "a" / "plan.json")
    loaded = plan_io.load_plan(first)
    assert loaded == plan
    plan_io.save_plan(loaded, tmp_path / "b.json")
    assert first.read_bytes() == (tmp_path / "b.json").read_bytes()
    assert sorted(p.name for p in first.parent.iterdir()) == ["plan.json"]


def test_canonical_form_rounds_floats_and_sorts_keys():
    plan = sample_plan()
    noisy = dataclasses.replace(plan, provenance=dataclasses.replace(
        plan.provenance, predicted_speedup=1.7 + 1e-12))
    assert plan_io.plan_to_json(noisy) == plan_io.plan_to_json(plan)
    text = plan_io.plan_to_json(plan)
    assert list(json.loads(text)) == sorted(json.loads(text)) and text.endswith("}\n")


def test_committed_schema_equals_generated_from_dataclasses():
    assert plan_schema.SCHEMA_PATH.read_text() == plan_schema.render_schema(), (
        "plan.schema.json is stale: run `python -m ditplan.policy.plan_schema --write` "
        "and bump PLAN_SCHEMA_VERSION"
    )
    schema = json.loads(plan_schema.SCHEMA_PATH.read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    for cls in plan_schema.plan_dataclasses():
        props = schema if cls.__name__ == "Plan" else schema["$defs"][cls.__name__]
        assert set(props["properties"]) == {f.name for f in dataclasses.fields(cls)}
    jsonschema.validate(valid_dict(), schema)


def test_runtime_lookups():
    plan = sample_plan(steps=6)
    spec = plan.attention_spec("blocks.2.attn1")
    assert spec.density == 0.3 and spec.density_for_head(0) == 0.1 and spec.dense_at(0)
    assert plan.attention_spec("blocks.9.attn1") == plan.defaults.attention
    assert set(plan.attention_specs()) == {f"blocks.{i}.attn1" for i in range(4)}
    run = plan.run_of("blocks.1")
    assert run is plan.run_of("blocks.2") and plan.run_of("blocks.0") is None
    assert [run.computes(s, "uncond") for s in range(6)] == [1, 1, 1, 0, 1, 0]
    assert run.actions("uncond") == "CCCRCR" and not run.forecasts
    with pytest.raises(PlanError, match="no schedule for context 'uncond'"):
        sample_plan(cfg=False).runs[0].computes(0, "uncond")


def _as_v2(data: dict) -> dict:
    """A 3.0 plan dict written back in the 2.0 format (cache groups of bool masks)."""
    data = dict(data, schema_version="2.0")
    data["cache_groups"] = [
        {"blocks": r["blocks"], "compute": {c: [a == "C" for a in s]
                                            for c, s in r["schedule"].items()}}
        for r in data.pop("runs")]
    return data


def test_v2_plan_migrates_to_reuse_runs(tmp_path):
    old = _as_v2(valid_dict())
    plan = plan_io.load_plan(write_json(tmp_path / "old.json", old))
    assert plan == sample_plan() and plan.schema_version == PLAN_SCHEMA_VERSION
    broken = dict(old, cache_groups=[{"blocks": ["blocks.1"]}])
    with pytest.raises(PlanError, match=r"cache_groups\[0\]: malformed 2.x"):
        plan_io.load_plan(write_json(tmp_path / "bad.json", broken))
    ancient = dict(old, schema_version="1.3")
    with pytest.raises(PlanError, match="old plan format.*compile-policy"):
        plan_io.load_plan(write_json(tmp_path / "ancient.json", ancient))


def test_forecast_runs_validate_their_settings():
    plan = sample_plan(steps=6)
    run = plan.runs[0]
    with pytest.raises(PlanError, match="order must be 1 or 2"):
        dataclasses.replace(run, order=3)
    with pytest.raises(PlanError, match="target must be one of"):
        dataclasses.replace(run, target="input")
    sigma = dataclasses.replace(run, schedule=dict.fromkeys(run.schedule, "CCFFCF"),
                                variable="sigma")
    with pytest.raises(PlanError, match="forecasting in sigma needs workload.sigmas"):
        dataclasses.replace(plan, runs=(sigma,))
    workload = dataclasses.replace(plan.workload, sigmas=(1.0, 0.8, 0.6, 0.4, 0.2, 0.1))
    ok = dataclasses.replace(plan, runs=(sigma,), workload=workload)
    assert ok.runs[0].forecasts and plan_io.normalize_plan(ok) == ok


@pytest.mark.parametrize("text, match", [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "a plan is a JSON object"),
    ('{"schema_version": 1}', "schema_version: missing or not 'major.minor'"),
    ('{"schema_version": "1.0", "x": NaN}', "NaN is not allowed"),
])
def test_malformed_files(tmp_path, text, match):
    (tmp_path / "p.json").write_text(text)
    with pytest.raises(PlanError, match=match):
        plan_io.load_plan(tmp_path / "p.json")


def test_missing_file_says_how_to_make_one(tmp_path):
    with pytest.raises(PlanError, match="does not exist; create it with `ditplan compile-policy`"):
        plan_io.load_plan(tmp_path / "absent.json")


def _edit(data, path, value=None, delete=False):
    node = data
    for key in path[:-1]:
        node = node[key]
    if delete:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return data


@pytest.mark.parametrize("path, value, delete, match", [
    (("workload",), None, True, "'workload' is a required property"),
    (("layers", "blocks.1", "role"), "middle", False, r"layers\.blocks\.1\.role: 'middle'"),
    (("workload", "steps"), "six", False, r"workload\.steps: 'six' is not of type 'integer'"),
    (("layers", "blocks.0", "attention", "density"), 1.5, False, "attention.density: 1.5"),
    (("layers", "blocks.0", "attention", "densty"), 0.2, False, "'densty' was unexpected"),
    (("runs", 0, "schedule", "cond"), "C", False, r"schedule\.cond: 1 steps for a 6-step"),
    (("runs", 0, "schedule", "cond"), "RCCCCC", False, r"does not match '\^C\[CRF\]\*\$'"),
    (("runs", 0, "schedule", "cond"), "CCXCCC", False, r"does not match"),
    (("runs", 0, "blocks"), ["blocks.9"], False, "not blocks of the plan"),
    (("runs", 0, "order"), 3, False, "3 is greater than the maximum of 2"),
    (("runs", 0, "target"), "input", False, "'input' is not one of"),
    (("block_order",), ["blocks.0"], False, "must list each key of layers"),
    (("layers", "blocks.0", "attention", "dense_steps"), [9], False, "past the workload"),
    (("layers", "blocks.2", "attention", "density"), 0.2, False, "must equal max"),
    (("layers", "blocks.0", "attention_module"), "blocks.9.attn1", False, "not inside block"),
])
def test_broken_fields_name_the_field(tmp_path, path, value, delete, match):
    file = write_json(tmp_path / "p.json", _edit(valid_dict(), path, value, delete))
    with pytest.raises(PlanError, match=match) as info:
        plan_io.load_plan(file)
    assert "p.json" in str(info.value)


def test_nonconsecutive_group_is_refused():
    plan = sample_plan()
    layers = dict(plan.layers)
    layers["blocks.3"] = dataclasses.replace(layers["blocks.3"], role="background")
    group = BlockRun(("blocks.1", "blocks.3"), plan.runs[0].schedule)
    with pytest.raises(PlanError, match="consecutive in block_order"):
        dataclasses.replace(plan, layers=layers, runs=(group,))


def test_version_policy(tmp_path):
    major, minor = (int(x) for x in PLAN_SCHEMA_VERSION.split("."))
    newer_major = _edit(valid_dict(), ("schema_version",), f"{major + 1}.0")
    with pytest.raises(PlanError, match="newer ditplan.*upgrade ditplan"):
        plan_io.load_plan(write_json(tmp_path / "a.json", newer_major))
    newer_minor = _edit(valid_dict(), ("schema_version",), f"{major}.{minor + 1}")
    newer_minor["future_field"] = {"x": 1}
    newer_minor["layers"]["blocks.0"]["attention"]["future_knob"] = 3
    plan = plan_io.load_plan(write_json(tmp_path / "b.json", newer_minor))
    assert plan.layers["blocks.0"].attention == sample_plan().layers["blocks.0"].attention
    same_minor = _edit(valid_dict(), ("future_field",), 1)
    with pytest.raises(PlanError, match="'future_field' was unexpected"):
        plan_io.load_plan(write_json(tmp_path / "c.json", same_minor))


def test_unsaveable_plan_leaves_no_file(tmp_path):
    plan = sample_plan()
    bad = dataclasses.replace(plan, provenance=dataclasses.replace(
        plan.provenance, predicted_error=float("nan")))
    with pytest.raises(PlanError, match="non-finite"):
        plan_io.save_plan(bad, tmp_path / "plan.json")
    assert list(tmp_path.iterdir()) == []


def test_attention_spec_head_densities_need_density():
    with pytest.raises(PlanError, match="need density set"):
        AttentionSpec(density=None, mass_threshold=0.9, head_densities=(0.2,))
    assert AttentionSpec(density=0.4, head_densities=(0.1, 0.4)).density_for_head(1) == 0.4


def test_attention_spec_estimate_heads():
    spec = AttentionSpec(density=0.3, head_densities=(0.1, 0.3), estimate_heads=[True, False])
    assert spec.estimate_heads == (True, False) and spec.estimates()
    assert not AttentionSpec(density=0.3, estimate_heads=(False, False)).estimates()
    with pytest.raises(PlanError, match="one per head"):
        AttentionSpec(density=0.3, head_densities=(0.1, 0.3), estimate_heads=(True,))
    with pytest.raises(PlanError, match="one true/false per head"):
        AttentionSpec(density=0.3, estimate_heads=(1, 0))
    plan = sample_plan()
    layers = dict(plan.layers)
    layers["blocks.2"] = dataclasses.replace(layers["blocks.2"], attention=spec)
    plan = dataclasses.replace(plan, layers=layers)
    again = plan_io.plan_from_json_text(plan_io.plan_to_json(plan))
    assert again.layers["blocks.2"].attention == spec
    text = plan_io.plan_to_json(plan).replace('"estimate_heads": [\n', '"estimate_heads": [1, ', 1)
    assert text != plan_io.plan_to_json(plan)
    with pytest.raises(PlanError, match="estimate_heads"):
        plan_io.plan_from_json_text(text)


def test_policy_package_never_imports_torch():
    code = ("import sys, ditplan.policy.compiler, ditplan.policy.commands, ditplan.policy.plan_io;"
            "import ditplan.policy.show; print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_plan_contract_does_not_import_its_reader():
    """plan.py holds the dataclasses only; plan_io (the reader) imports it, never the reverse."""
    code = ("import sys, ditplan.policy.plan; "
            "print('ditplan.policy.plan_io' in sys.modules, "
            "'ditplan.policy.plan_schema' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False False"
