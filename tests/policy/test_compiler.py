"""compile_policy end to end on synthetic traces: known answers, determinism, budget, bad input."""

from __future__ import annotations

import math

import numpy as np
import pyarrow.parquet as pq
import pytest

from ditplan.policy.classify import classify_roles
from ditplan.policy.compiler import compile_policy, search_designs
from ditplan.policy.config import CompilerConfig, CompilerError
from ditplan.policy.cost import CostModel
from ditplan.policy.load_profile import load_profile
from ditplan.policy.plan_io import plan_to_json
from ditplan.profiler import schema as S
from tests.policy.policy_factories import LayerTruth, TraceSpec, write_traces

# fg, bg, bg, fg (poorly predicted), bg, fg (mass spread: no density reaches 0.9)
LAYERS = (LayerTruth(True, 0.1), LayerTruth(False, 0.2), LayerTruth(False, 0.1),
          LayerTruth(True, 0.1, prediction=0.8), LayerTruth(False, 0.1), LayerTruth(True, 0.9))


@pytest.fixture(scope="module")
def traces(tmp_path_factory):
    return write_traces(tmp_path_factory.mktemp("traces"), TraceSpec(layers=LAYERS))


@pytest.fixture(scope="module")
def plan(traces):
    return compile_policy(traces, CompilerConfig.from_name("balanced"))


def test_known_answers(plan):
    roles = [plan.layers[b].role for b in plan.block_order]
    assert roles == ["foreground", "background", "background", "foreground", "background",
                     "foreground"]
    density = {b: lp.attention.density for b, lp in plan.layers.items()}
    assert 0.08 <= density["blocks.0"] <= 0.12 and 0.17 <= density["blocks.1"] <= 0.21
    assert density["blocks.3"] == 1.0 and density["blocks.5"] == 1.0
    assert plan.layers["blocks.0"].attention.dense_steps == (0, 1, 2)  # change settles at 3
    assert [g.blocks for g in plan.runs] == [("blocks.1", "blocks.2"), ("blocks.4",)]
    mask = plan.runs[0].compute_mask("cond")
    assert mask[:4] == (True,) * 4 and not all(mask) and mask[-2:] == (True, True)
    assert plan.runs[0].compute_mask("uncond") == mask  # branches agree
    assert plan.provenance.predicted_speedup > 1.0 and plan.provenance.predicted_error > 0


def test_deterministic_and_independent_of_file_names(traces, plan, tmp_path):
    again = compile_policy(traces, CompilerConfig.from_name("balanced"))
    assert plan_to_json(again) == plan_to_json(plan)
    for path in sorted(traces.iterdir()):  # same bytes under other names: same plan
        (tmp_path / f"renamed-{path.name[::-1]}.parquet").write_bytes(path.read_bytes())
    renamed = compile_policy(tmp_path, CompilerConfig.from_name("balanced"))
    assert plan_to_json(renamed) == plan_to_json(plan)


def test_presets_trade_speed_for_error(traces):
    plans = {q: compile_policy(traces, CompilerConfig.from_name(q))
             for q in ("high", "balanced", "fast")}
    speed = [plans[q].provenance.predicted_speedup for q in ("high", "balanced", "fast")]
    error = [plans[q].provenance.predicted_error for q in ("high", "balanced", "fast")]
    assert speed == sorted(speed) and error == sorted(error) and speed[0] < speed[-1]


def search_designs_for(traces):
    """Every design the compiler searches for ``traces`` (balanced preset)."""
    base = CompilerConfig.from_name("balanced")
    profile = load_profile(traces)
    roles = classify_roles(profile, base).roles
    model = CostModel.for_model(profile.metadata.model_config,
                                profile.metadata.workload.num_tokens, profile.densities,
                                profile.kept_fraction)
    return search_designs(profile, roles, base, model)


def test_target_speedup_picks_least_error_that_reaches_it(traces, plan):
    designs = search_designs_for(traces)
    assert any(d.family in ("stack forecast1", "tail reuse") for d in designs)  # step-level too
    target = float(np.median([d.speedup for d in designs]))
    chosen = compile_policy(traces, CompilerConfig.from_name("balanced", target_speedup=target))
    assert chosen.provenance.predicted_speedup >= target - 1e-5  # plan floats: 6 digits
    best_error = min(d.error for d in designs if d.speedup >= target)
    assert chosen.provenance.predicted_error == pytest.approx(best_error, rel=1e-5)
    assert chosen.provenance.compiler_settings["target_speedup"] == pytest.approx(target, rel=1e-5)
    best = max(d.speedup for d in designs)
    with pytest.raises(CompilerError, match=f"not reachable.*best predicted is {best:.3f}x"):
        compile_policy(traces, CompilerConfig.from_name("balanced", target_speedup=best + 0.5))
    # just short of a round target: the suggestion is rounded down, never up to the target
    short = math.floor(best * 100) / 100
    with pytest.raises(CompilerError, match=f"ask for at most {short:.2f}x"):
        compile_policy(traces, CompilerConfig.from_name("balanced", target_speedup=best + 1e-4))


def test_separate_schedules_when_cfg_branches_differ(tmp_path):
    spec = TraceSpec(layers=LAYERS[:3], uncond_decay=0.4, steps=16)
    plan = compile_policy(write_traces(tmp_path, spec), CompilerConfig.from_name("balanced"))
    group = plan.runs[0]
    cond, uncond = group.compute_mask("cond"), group.compute_mask("uncond")
    assert cond != uncond and uncond.index(False) > cond.index(False)  # uncond warms up longer


def test_without_cfg_only_cond(tmp_path):
    plan = compile_policy(write_traces(tmp_path, TraceSpec(layers=LAYERS[:3], cfg=False)))
    assert plan.workload.contexts == ("cond",) and set(plan.runs[0].schedule) == {"cond"}


def test_role_and_density_overrides(traces):
    config = CompilerConfig.from_name("balanced", all_roles="foreground",
                                      roles={"blocks.5": "background"}, fixed_density=0.2)
    plan = compile_policy(traces, config)
    assert [g.blocks for g in plan.runs] == [("blocks.5",)]
    assert {lp.attention.density for lp in plan.layers.values()} == {0.2}


def test_bad_trace_directories(traces, tmp_path):
    with pytest.raises(S.TraceError, match="no trace files"):
        compile_policy(tmp_path / "missing")
    partial = tmp_path / "partial"
    partial.mkdir()
    for path in traces.glob("attention_*.parquet"):
        (partial / path.name).write_bytes(path.read_bytes())
    with pytest.raises(S.TraceError, match=r"lack tables \['step_change'\]"):
        compile_policy(partial)
    mixed = write_traces(tmp_path / "mixed", TraceSpec(layers=LAYERS))
    other = TraceSpec(layers=LAYERS, fingerprint=S.ModelFingerprint("Other", "x"))
    write_traces(tmp_path / "other", other)
    (mixed / "zz.parquet").write_bytes((tmp_path / "other" / "step_change-p0.parquet").read_bytes())
    with pytest.raises(S.TraceError, match="own directory"):
        compile_policy(mixed)


def test_missing_rows_are_refused(traces, tmp_path):
    for path in traces.iterdir():
        table = pq.read_table(path)
        if path.name.startswith("attention_recall-p0"):
            table = table.slice(0, table.num_rows - 1)
        pq.write_table(table, tmp_path / path.name)
    with pytest.raises(S.TraceError, match="rows are missing"):
        compile_policy(tmp_path)
