"""The error model corrected by measurements: fitted offsets and the second calibration round."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from ditplan.policy.config import CompilerConfig
from ditplan.policy.plan import IDENTICAL_PSNR_DB, BlockRun, Calibration
from ditplan.policy.ranking import fit_offsets, skip_kinds, warmup_of
from tests.policy.policy_factories import LayerTruth, TraceSpec, write_traces

WARMUP = {2: 0.0, 3: 2.5, 4: 6.0}  # dB the error model misjudges per warm-up
KIND = {"R": 4.0, "F1": 1.0, "F2": -2.0}  # and per skip kind


def run(warmup: int, kind: str, steps: int = 16) -> tuple[BlockRun, ...]:
    """A whole-call run computing ``warmup`` steps, then alternating skip and compute."""
    actions = "C" * warmup + ("RC" if kind == "R" else "FC") * steps
    order = int(kind[1]) if kind != "R" else 1
    return (BlockRun(("blocks.0",), {"cond": actions[:steps]}, target="model", order=order),)


def truth(runs, error: float) -> float:
    """The PSNR a design 'measures' in these tests: 10 dB + offsets - 20 log10(error)."""
    return 10.0 + WARMUP[warmup_of(runs)] + KIND[skip_kinds(runs)[0]] - 20.0 * math.log10(error)


def test_run_helper_gives_the_warmup_and_kind_asked():
    assert [(warmup_of(run(w, k)), skip_kinds(run(w, k))) for w, k in
            ((2, "R"), (4, "F2"), (3, "F1"))] == [(2, ("R",)), (4, ("F2",)), (3, ("F1",))]


def test_additive_offsets_are_recovered_and_predict_an_unmeasured_pair():
    measured = [(2, "R"), (2, "F1"), (2, "F2"), (3, "F1"), (4, "F2"), (4, "F1")]
    points = [(run(w, k), e, truth(run(w, k), e))
              for (w, k), e in zip(measured, (0.05, 0.03, 0.02, 0.04, 0.06, 0.08), strict=True)]
    offsets = fit_offsets(points)
    for runs, error, psnr in points:
        assert offsets.psnr_db(runs, error) == pytest.approx(psnr, abs=1e-9)
    # reuse after 4 warm-up steps was never measured: its warm-up and kind were
    unmeasured = run(4, "R")
    assert offsets.psnr_db(unmeasured, 0.1) == pytest.approx(truth(unmeasured, 0.1), abs=1e-9)


def test_an_unmeasured_warmup_gets_the_mean_offset_and_one_point_keeps_the_error_order():
    points = [(run(2, "R"), 0.05, 30.0), (run(4, "R"), 0.05, 36.0)]
    offsets = fit_offsets(points)
    assert offsets.psnr_db(run(3, "R"), 0.05) == pytest.approx(33.0)
    single = fit_offsets([(run(2, "F2"), 0.05, 30.0)])
    errors = [0.2, 0.01, 0.07]
    ranked = sorted(errors, key=lambda e: -single.psnr_db(run(4, "R"), e))
    assert ranked == sorted(errors)


def test_points_identical_to_dense_or_not_finite_are_left_out():
    good = (run(2, "R"), 0.05, 30.0)
    bad = [(run(4, "R"), 0.05, IDENTICAL_PSNR_DB), (run(4, "R"), 0.0, 30.0),
           (run(4, "R"), 0.05, math.nan), (run(4, "R"), math.inf, 30.0)]
    assert fit_offsets(bad) is None
    offsets = fit_offsets([good, *bad])
    assert offsets.warmup.keys() == {2}
    assert offsets.psnr_db(*good[:2]) == pytest.approx(30.0)


@pytest.fixture(scope="module")
def traces(tmp_path_factory):
    layers = (LayerTruth(True, 0.1), LayerTruth(False, 0.2), LayerTruth(False, 0.1),
              LayerTruth(True, 0.1))
    return write_traces(tmp_path_factory.mktemp("traces"), TraceSpec(layers=layers, steps=16))


@pytest.mark.parametrize("reuse_bonus", [12.0, -12.0])
def test_second_round_ranks_by_what_the_first_measured(traces, reuse_bonus):
    from ditplan.policy.compiler import closer_to_target
    from tests.policy.test_compiler import search_designs_for

    designs = search_designs_for(traces)
    config = CompilerConfig.from_name("balanced", target_speedup=1.5, calibrate_candidates=8)
    first = {}  # measured first: the least predicted error of each warm-up and skip kind
    for d in sorted((d for d in designs if d.speedup >= 1.5), key=lambda d: d.error):
        first.setdefault((warmup_of(d.runs), skip_kinds(d.runs)), d)
    first = list(first.values())
    assert {skip_kinds(d.runs) for d in first} >= {("R",), ("F1",)}

    def measure(d):  # the error model is right but for reuse, off by reuse_bonus dB
        bonus = reuse_bonus if all(k == "R" for k in skip_kinds(d.runs)) else 0.0
        psnr = 10.0 + bonus - 20.0 * math.log10(d.error)
        return Calibration(device="cpu", prompts=2, speedup=d.speedup, psnr_db=psnr,
                           cosine=0.99, dense_s=2.0, plan_s=2.0 / d.speedup, candidates=8)

    second = closer_to_target(designs, first, [measure(d) for d in first], config)
    assert second
    reuse = [all(k == "R" for k in skip_kinds(d.runs)) for d in second]
    # the best of each warm-up leads: reuse wherever the band holds one, when reuse measured well
    assert reuse[0] is (reuse_bonus > 0)


# Session 22's first calibration round at 4x on the long reference model (H200, calibration
# captions; BENCHMARKS.md issue 15): label -> (measured speedup, PSNR dB).
LONG_4X_FIRST_ROUND = {
    "model forecast2 t=0.208 skip<=2 warmup=2 cooldown=0 recall=0.8 estimate=measured "
    "attention-warmup=2": (4.062, 23.763),
    "model forecast2 t=0.277 skip<=2 warmup=2 cooldown=0 recall=0.85 estimate=measured "
    "attention-warmup=2": (4.242, 25.108),
    "model forecast1 t=0.208 skip<=2 warmup=2 cooldown=0 recall=0.8 estimate=measured "
    "attention-warmup=2": (4.089, 24.681),
    "model forecast2 t=inf skip<=2 warmup=4 cooldown=0 recall=0.8 estimate=measured "
    "attention-warmup=4": (3.920, 27.484),
    "model forecast1 t=0.277 skip<=2 warmup=2 cooldown=0 recall=0.85 estimate=measured "
    "attention-warmup=2": (4.254, 25.948),
    "model forecast1 t=inf skip<=2 warmup=4 cooldown=0 recall=0.8 estimate=measured "
    "attention-warmup=4": (3.970, 28.088),
    "model reuse t=0.208 skip<=2 warmup=2 cooldown=0 recall=0.8 estimate=measured "
    "attention-warmup=2": (4.084, 25.550),
    "model reuse t=0.277 skip<=2 warmup=2 cooldown=0 recall=0.85 estimate=measured "
    "attention-warmup=2": (4.238, 26.378),
}


def test_long_model_second_round_replays_session_22_measurements():
    """On the shipped long traces, session 22's measured first round at 4x makes the second
    round measure reuse after 4 warm-up steps first (measured in session 23: 4.14x at 29.82 dB,
    the pick; the error model alone ranks that pair last)."""
    from ditplan.policy.compiler import calibration_shortlist, closer_to_target

    traces = Path(__file__).resolve().parents[2] / "artifacts" / "traces" / "ditplan-ref-t2v-long"
    config = CompilerConfig.from_name("balanced", target_speedup=4.0, calibrate_candidates=8)
    found = calibration_shortlist(traces, config)
    designs, first = found.designs, found.chosen
    assert {d.label for d in first} == set(LONG_4X_FIRST_ROUND), (
        "the 4x first round on the shipped long traces changed: session 22's measurements no "
        "longer replay; measure the new shortlist and update LONG_4X_FIRST_ROUND")
    measured = [Calibration(device="NVIDIA H200", prompts=8, speedup=s, psnr_db=p, cosine=0.99,
                            dense_s=14.5, plan_s=14.5 / s, candidates=8)
                for s, p in (LONG_4X_FIRST_ROUND[d.label] for d in first)]
    second = closer_to_target(designs, first, measured, config)
    lead = second[0]
    assert (warmup_of(lead.runs), skip_kinds(lead.runs)) == (4, ("R",))
    assert lead.runs[0].whole_call
