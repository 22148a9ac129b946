"""Refinement after calibration moves single compute steps and keeps what measures better."""

from __future__ import annotations

import pytest

from ditplan.policy.compiler import compile_policy
from ditplan.policy.config import CompilerConfig
from ditplan.policy.load_profile import load_profile
from ditplan.policy.plan import BlockRun, Calibration
from ditplan.policy.refine import _source, moved, neighbours, run_moves
from tests.policy.policy_factories import LayerTruth, TraceSpec, write_traces


def test_moves_keep_the_budget_and_step_zero():
    run = BlockRun(("blocks.0",), {"cond": "CCFCF", "uncond": "CFFFC"})
    moves = run_moves(run)
    assert moved("CCFCF", 3, 2) == "CCCFF"
    changed = {c: [m.schedule[c] for m in moves if m.schedule[c] != run.schedule[c]]
               for c in run.schedule}
    assert sorted(changed["cond"]) == ["CCCFF", "CCFFC", "CFCCF"]
    assert changed["uncond"] == ["CFFCF"] and len(moves) == 4  # one context moves at a time
    for m in moves:
        assert all(s.startswith("C") for s in m.schedule.values())
        assert [s.count("C") for s in m.schedule.values()] == [3, 2]


def test_shared_schedules_also_move_together():
    run = BlockRun(("blocks.0",), {"cond": "CCF", "uncond": "CCF"})
    moves = [tuple(m.schedule.values()) for m in run_moves(run)]
    assert moves[0] == ("CFC", "CFC")  # the whole-batch move comes first
    assert sorted(moves[1:]) == [("CCF", "CFC"), ("CFC", "CCF")]


def test_neighbours_spread_over_source_steps(traces):
    plan = compile_policy(traces, CompilerConfig.from_name("balanced", target_speedup=2.0))
    options = neighbours(plan, load_profile(traces), limit=3)
    sources = [_source(run, new.runs[0]) for new in options for run in plan.runs[:1]]
    assert len(options) == 3 and len(set(sources)) == 3


@pytest.fixture(scope="module")
def traces(tmp_path_factory):
    layers = (LayerTruth(True, 0.1), LayerTruth(False, 0.2), LayerTruth(False, 0.1))
    return write_traces(tmp_path_factory.mktemp("traces"), TraceSpec(layers=layers, steps=16))


def test_refinement_climbs_to_what_measures_better(traces):
    measured_plans = []

    def fake(plans, repeats=None):  # PSNR rewards computing later steps in cond (proxy-blind)
        measured_plans.extend(plans)
        out = []
        for p in plans:
            late = sum(step / 10 for r in p.runs for step, a in enumerate(r.schedule["cond"])
                       if a == "C")
            out.append(Calibration(device="cpu", prompts=1, speedup=2.1, psnr_db=20.0 + late,
                                   cosine=0.99, dense_s=2.1, plan_s=1.0, candidates=1))
        return out

    base = CompilerConfig.from_name("balanced", target_speedup=2.0, calibrate_candidates=1)
    plain = compile_policy(traces, base, calibrate=fake)
    refined = compile_policy(traces, CompilerConfig.from_name(
        "balanced", target_speedup=2.0, calibrate_candidates=1, refine_rounds=3,
        refine_candidates=40), calibrate=fake)
    assert refined.provenance.calibration.psnr_db > plain.provenance.calibration.psnr_db
    assert refined.provenance.calibration.candidates > plain.provenance.calibration.candidates
    for a, b in zip(refined.runs, plain.runs, strict=True):
        assert [s.count("C") for s in a.schedule.values()] == [
            s.count("C") for s in b.schedule.values()]  # the same budget
