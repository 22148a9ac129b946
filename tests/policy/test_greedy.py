"""Replayed forecast error on residual sketches and the greedy schedule ladder built on it."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest

from ditplan.policy.compiler import compile_policy
from ditplan.policy.config import CompilerConfig
from ditplan.policy.greedy import MIN_COMPUTE_SHARE, greedy_ladder
from ditplan.policy.load_profile import load_profile
from ditplan.policy.plan import BlockRun
from ditplan.policy.quality import replayed_error
from ditplan.profiler.schema import TraceError
from tests.policy.policy_factories import LayerTruth, TraceSpec, write_traces

LAYERS = (LayerTruth(True, 0.1), LayerTruth(False, 0.2), LayerTruth(False, 0.1))
STEPS, SPIKE = 12, 7


@pytest.fixture(scope="module")
def traces(tmp_path_factory):
    spec = TraceSpec(layers=LAYERS, steps=STEPS, sketch_size=32, sketch_spike=SPIKE)
    return write_traces(tmp_path_factory.mktemp("sketched"), spec)


@pytest.fixture(scope="module")
def profile(traces):
    return load_profile(traces)


def stack(profile, schedule: str, order: int = 1) -> BlockRun:
    return BlockRun(blocks=profile.blocks, schedule=dict.fromkeys(profile.contexts, schedule),
                    order=order)


def test_sketches_load_per_prompt_context_layer_and_step(profile):
    assert profile.sketches.shape == (2, 2, len(LAYERS) + 1, STEPS, 32)


def test_replayed_error_knows_a_line_from_a_spike(profile):
    assert replayed_error(profile, stack(profile, "C" * STEPS), "cond") == 0.0
    # residuals move on lines: an order-1 forecast is exact away from the spike, reuse is not
    line = "CC" + "F" * 4 + "C" * 6
    assert replayed_error(profile, stack(profile, line), "cond") == pytest.approx(0, abs=1e-6)
    reused = stack(profile, line.replace("F", "R"))
    assert replayed_error(profile, reused, "cond") > 1e-3
    # forecasting over the spike (step 7) misses it; the step after it extrapolates its slope
    over = "C" * 7 + "F" + "C" * 4
    after = "C" * 8 + "F" + "C" * 3
    assert replayed_error(profile, stack(profile, over), "cond") > 1e-3
    assert replayed_error(profile, stack(profile, after), "cond") > 1e-3


def test_ladder_skips_one_step_per_rung_and_keeps_the_spike(profile):
    ladder = greedy_ladder(profile, stack(profile, "C"), "F")
    contexts = len(profile.contexts)
    computes = [sum(r.actions(c).count("C") for c in profile.contexts) for r in ladder]
    assert computes == list(range(STEPS * contexts - 1, STEPS * contexts - 1 - len(computes), -1))
    assert computes[-1] == int(np.ceil(MIN_COMPUTE_SHARE * STEPS * contexts))
    for run in ladder:
        for c in profile.contexts:
            assert run.actions(c)[0] == "C" and len(run.actions(c)) == STEPS
    # while half the steps still compute, the spike and the step after it do (a forecast
    # through either is wrong), and every skip is a forecast from two computed steps
    half = [r for r, n in zip(ladder, computes, strict=True) if n >= STEPS * contexts // 2]
    for run in half:
        for c in profile.contexts:
            actions = run.actions(c)
            assert actions[SPIKE] == "C" and actions[SPIKE + 1] == "C", actions
            assert actions[1] == "C"


def test_ladder_error_grows_down_the_rungs(profile):
    ladder = greedy_ladder(profile, stack(profile, "C", order=2), "F")
    errors = [sum(replayed_error(profile, r, c) for c in profile.contexts) for r in ladder]
    assert errors[0] <= errors[len(errors) // 2] <= errors[-1]
    assert errors[-1] > 0


def test_compiler_offers_greedy_designs_with_sketches(traces):
    plan = compile_policy(traces, CompilerConfig.from_name("balanced", target_speedup=1.6))
    assert "greedy" in plan.provenance.compiler_settings["design"]


def test_sketches_of_different_lengths_are_refused(tmp_path):
    spec = TraceSpec(layers=LAYERS, steps=4, prompts=1, sketch_size=8)
    write_traces(tmp_path, spec)
    path = next(tmp_path.glob("residual_sketch-*.parquet"))
    table = pq.read_table(path)
    short = table.set_column(table.schema.get_field_index("sketch"), "sketch",
                             [[row[:4] if i == 0 else row
                               for i, row in enumerate(table["sketch"].to_pylist())]])
    pq.write_table(short.cast(table.schema), path)
    with pytest.raises(TraceError, match="different lengths"):
        load_profile(tmp_path)
