"""Regression: saved traces in artifacts/traces/<model>/ compile to the committed golden plans.

Golden plans live at artifacts/plans/<model>-<preset>.json. After a deliberate change of the
compiler, regenerate them with ``pytest tests/policy/test_compiler_golden.py --update-golden``
and commit the diff.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from ditplan.policy.compiler import compile_policy
from ditplan.policy.config import QUALITY_PRESETS, CompilerConfig
from ditplan.policy.plan_io import plan_to_json, save_plan

ARTIFACTS = Path(__file__).resolve().parents[2] / "artifacts"
TRACE_ROOT, PLAN_ROOT = ARTIFACTS / "traces", ARTIFACTS / "plans"


def golden_cases(trace_root: Path = TRACE_ROOT) -> list:
    """One case per (model trace directory, preset); a skipped placeholder when none exist."""
    models = sorted(p for p in trace_root.glob("*") if p.is_dir() and any(p.rglob("*.parquet")))
    if not models:
        reason = f"no saved traces under {trace_root} yet (they come with `ditplan profile`)"
        return [pytest.param(None, None, marks=pytest.mark.skip(reason=reason), id="no-traces")]
    return [pytest.param(m, q, id=f"{m.name}-{q}") for m in models for q in QUALITY_PRESETS]


def check_golden(trace_dir: Path, preset: str, golden: Path, update: bool) -> None:
    """Compile ``trace_dir`` with ``preset`` and compare with (or, if ``update``, rewrite)
    the golden plan file byte for byte."""
    plan = compile_policy(trace_dir, CompilerConfig.from_name(preset))
    if update:
        save_plan(plan, golden)
    assert golden.exists(), (
        f"{golden} is missing; create it with `pytest {Path(__file__).name} --update-golden`"
    )
    assert plan_to_json(plan) == golden.read_text(), (
        f"{trace_dir} no longer compiles to {golden}; if the change is intended, rerun with "
        f"--update-golden and commit the new plan"
    )


@pytest.mark.parametrize("trace_dir, preset", golden_cases())
def test_saved_traces_compile_to_golden_plan(request, trace_dir, preset):
    golden = PLAN_ROOT / f"{trace_dir.name}-{preset}.json"
    check_golden(trace_dir, preset, golden, request.config.getoption("--update-golden",
                                                                     default=False))


def test_golden_mechanism_on_synthetic_traces(tmp_path):
    from tests.policy.policy_factories import LayerTruth, TraceSpec, write_traces

    spec = TraceSpec(layers=(LayerTruth(True), LayerTruth(False), LayerTruth(False)))
    traces = write_traces(tmp_path / "traces" / "tiny", spec)
    assert [c.id for c in golden_cases(tmp_path / "traces")] == [
        f"tiny-{q}" for q in QUALITY_PRESETS]
    golden = tmp_path / "plans" / "tiny-balanced.json"
    with pytest.raises(AssertionError, match="is missing"):
        check_golden(traces, "balanced", golden, update=False)
    check_golden(traces, "balanced", golden, update=True)
    check_golden(traces, "balanced", golden, update=False)
    golden.write_text(golden.read_text().replace('"quality": "balanced"', '"quality": "fast"'))
    with pytest.raises(AssertionError, match="no longer compiles"):
        check_golden(traces, "balanced", golden, update=False)


@pytest.mark.parametrize("preset", sorted(QUALITY_PRESETS))
@pytest.mark.parametrize("model", ["ditplan-ref-t2v", "ditplan-ref-t2v-long"])
def test_every_sparse_layer_saves_time_by_the_cost_model_with_mixed_heads(model, preset):
    # a mixed-heads layer that keeps most heads dense would cost selection for little saved
    # attention: the compiler keeps it dense (on the small model's traces high and balanced
    # had such a layer, fast too)
    from ditplan.policy.cost import CostModel
    from ditplan.policy.load_profile import load_profile

    trace_dir = TRACE_ROOT / model
    plan = compile_policy(trace_dir, CompilerConfig.from_name(preset, mixed_heads=True))
    profile = load_profile(trace_dir)
    meta = profile.metadata
    cost = CostModel.for_model(meta.model_config, meta.workload.num_tokens, profile.densities,
                               profile.kept_fraction)
    sparse = [layer.attention for layer in plan.layers.values() if not layer.attention.is_dense]
    assert all(cost.sparse_factor(spec) < 1.0 for spec in sparse)
    if model.endswith("long"):  # its heads are bimodal: some layers mix dense and sparse heads
        assert any(1.0 in (spec.head_densities or ()) for spec in sparse)
