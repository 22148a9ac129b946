"""The shipped calibrated plan is one the compiler searches from the shipped traces, and says
what calibration measured."""

from __future__ import annotations

from pathlib import Path

import pytest

from ditplan.policy.classify import classify_roles
from ditplan.policy.compiler import search_designs
from ditplan.policy.config import CompilerConfig
from ditplan.policy.cost import CostModel
from ditplan.policy.load_profile import load_profile
from ditplan.policy.plan_io import load_plan

ARTIFACTS = Path(__file__).resolve().parents[2] / "artifacts"
TRACES = ARTIFACTS / "traces" / "ditplan-ref-t2v"
CALIBRATED = ARTIFACTS / "plans" / "ditplan-ref-t2v-calibrated.json"


@pytest.fixture(scope="module")
def plan():
    return load_plan(CALIBRATED)


def test_calibrated_plan_records_its_measurement(plan):
    calibration = plan.provenance.calibration
    assert calibration is not None and calibration.device == "cpu"
    assert calibration.psnr_db >= plan.provenance.compiler_settings["min_psnr"]
    assert calibration.speedup >= 1.5 and calibration.candidates > 1


def test_calibrated_plan_is_a_design_of_the_shipped_traces(plan):
    profile = load_profile(TRACES)
    assert plan.provenance.trace_hash == profile.trace_hash
    settings = dict(plan.provenance.compiler_settings)
    settings.pop("design")
    config = CompilerConfig(**settings)
    roles = classify_roles(profile, config).roles
    meta = profile.metadata
    cost = CostModel.for_model(meta.model_config, meta.workload.num_tokens, profile.densities,
                               profile.kept_fraction)
    attention = {b: lp.attention for b, lp in plan.layers.items()}
    designs = [d for d in search_designs(profile, roles, config, cost) if d.runs == plan.runs
               and {b: lp.attention for b, lp in d.layers.items()} == attention]
    assert len(designs) == 1, "the compiler no longer searches this plan: recalibrate it"


@pytest.mark.parametrize("target", [2.0, 3.0])
def test_shipped_traces_reach_2x_and_3x_targets(target):
    from ditplan.policy.compiler import compile_policy

    plan = compile_policy(TRACES, CompilerConfig.from_name("balanced", target_speedup=target))
    assert plan.provenance.predicted_speedup >= target
    assert any(set("".join(r.schedule.values())) - {"C"} for r in plan.runs)


@pytest.fixture(scope="module")
def long_transformer():
    from ditplan.runtime.loading import load_pipeline

    return load_pipeline(str(ARTIFACTS / "models" / "ditplan-ref-t2v-long"),
                         device="cpu").transformer


@pytest.mark.parametrize("preset", ["high", "balanced", "fast"])
def test_long_plans_fit_the_shipped_long_model(long_transformer, preset):
    """The long model's golden plans come from traces of the weights that ship beside them: the
    runtime accepts them on that model, weights included (a retrained export needs new traces)."""
    from ditplan.runtime.adapters.base import get_adapter
    from ditplan.runtime.apply import check_plan_fits

    plan = load_plan(ARTIFACTS / "plans" / f"ditplan-ref-t2v-long-{preset}.json")
    check_plan_fits(plan, long_transformer, get_adapter(long_transformer), check_weights=True)
