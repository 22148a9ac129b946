"""Issue 15's goals judged from hand-made rows, the long suite's profile steps, the layer choice."""

import math

import pytest

from benchmarks.quality.goals import (
    caching_gain,
    caching_reach,
    caching_speedup_at,
    goal_lines,
    sparse_quality,
)
from benchmarks.quality.sparse_layers import LayerChoice
from benchmarks.quality.workload import LONG_SUITE, REFERENCE_SUITE, evenly_spaced


def row(method, speedup, psnr, *, cosine=0.99, density=1.0, skipped=0.0, params=None,
        status="ok", layers=()):
    family, setting = method.split("/")
    stats = {"attention_density": density, "blocks_skipped_share": skipped}
    if layers:
        stats["sparse_layers"] = list(layers)
    return {"method": method, "family": family, "setting": setting, "status": status,
            "reason": None if status == "ok" else "why", "speedup": speedup,
            "psnr_db_mean": psnr, "cosine_mean": cosine, "params": params or {}, "stats": stats}


CACHE_ONLY = [row("ditplan-cache-only/high", 1.2, 36.0, skipped=0.2),
              row("ditplan-cache-only/balanced", 1.6, 32.0, skipped=0.4),
              row("ditplan-cache-only/fast", 2.0, 28.0, skipped=0.5)]


def test_caching_speedup_at_joins_the_points_linearly_within_their_psnrs():
    curve = [(r["speedup"], r["psnr_db_mean"]) for r in CACHE_ONLY]
    assert caching_speedup_at(curve, 34.0) == pytest.approx(1.4)
    assert caching_speedup_at(curve, 32.0) == pytest.approx(1.6)
    assert caching_speedup_at(curve, 28.0) == pytest.approx(2.0)
    assert caching_speedup_at(curve, 37.0) is None and caching_speedup_at(curve, 27.0) is None
    # a non-monotone curve: the fastest speed at which some stretch stays >= the PSNR
    assert caching_speedup_at([(1.2, 30.0), (1.5, 34.0), (2.0, 29.0)], 30.0) == pytest.approx(1.9)
    # where it comes from: a point, or the two points joined (indices into the curve)
    assert caching_reach(curve, 32.0) == (pytest.approx(1.6), (1,))
    assert caching_reach([(2.0, 29.0), (1.5, 34.0), (1.2, 30.0)], 30.0)[1] == (1, 0)
    # a dominated point (slower and blurrier than another) is not joined: long model, session 22
    curve = [(2.87, 31.94), (3.10, 27.47), (3.49, 29.08)]
    assert caching_reach(curve, 29.76) == (pytest.approx(2.87 + 0.62 * 2.18 / 2.86), (0, 2))


def test_caching_gain_met_missed_and_not_measured():
    fast = row("ditplan/target=2x", 1.96, 34.0, density=0.3, skipped=0.4)  # cache-only: 1.4x
    verdict = caching_gain([*CACHE_ONLY, fast])
    assert verdict.met is True
    assert verdict.detail == ("ditplan/target=2x: 1.96x at 34.00 dB; caching only reaches that "
                              "PSNR at 1.40x: 1.40x faster (1 of 1 sparse + caching plans "
                              "compared; caching only from ditplan-cache-only/high (1.20x, "
                              "36.00 dB) and ditplan-cache-only/balanced (1.60x, 32.00 dB))")
    slow = row("ditplan/high", 1.5, 34.0, density=0.3, skipped=0.3)  # 1.5 / 1.4 = 1.07x
    assert caching_gain([*CACHE_ONLY, slow]).met is False
    assert "1.07x faster" in caching_gain([*CACHE_ONLY, slow]).detail
    # the best ratio counts; a plan outside the caching-only PSNRs is not compared
    outside = row("ditplan/fast", 5.0, 40.0, density=0.3, skipped=0.5)
    both = caching_gain([*CACHE_ONLY, slow, fast, outside])
    assert both.met is True and "(2 of 3 sparse + caching plans compared;" in both.detail
    assert caching_gain([*CACHE_ONLY, outside]).met is None
    # every plan family counts (estimated, mixed heads), the caching-only one never
    estimated = row("ditplan-mixed-heads-estimated-all/fast", 2.1, 33.0, density=0.5,
                    skipped=0.4)  # cache-only at 33 dB: 1.5x
    verdict = caching_gain([*CACHE_ONLY, estimated])
    assert verdict.met is True and verdict.detail.startswith("ditplan-mixed-heads-estimated-all")
    # a ditplan plan that ran dense attention is caching only: nothing to compare
    dense_attention = row("ditplan/balanced", 1.96, 34.0, density=1.0, skipped=0.4)
    verdict = caching_gain([*CACHE_ONLY, dense_attention])
    assert verdict.met is None and "0 sparse + caching plans" in verdict.detail



def test_calibrated_plans_join_their_curves():
    """A calibrated caching-only plan extends the caching-only curve (the best caching plan is
    the measured one); a calibrated plan with sparse attention is compared against it."""
    fast = row("ditplan/target=2x", 1.96, 34.0, density=0.3, skipped=0.4)
    calibrated_cache = row("ditplan-cache-only-calibrated/target=2x", 1.9, 34.5, skipped=0.5)
    verdict = caching_gain([*CACHE_ONLY, calibrated_cache, fast])
    assert verdict.met is False and "reaches that PSNR at 1.91x: 1.03x" in verdict.detail
    calibrated = row("ditplan-calibrated/target=3x", 2.7, 34.0, density=0.4, skipped=0.5)
    verdict = caching_gain([*CACHE_ONLY, calibrated_cache, calibrated])
    assert verdict.met is True and verdict.detail.startswith("ditplan-calibrated/target=3x")


def test_saved_caching_only_plans_join_the_curve_and_saved_sparse_plans_are_not_judged():
    """A --plan-files row that runs attention dense and skips blocks is a caching-only plan
    (made by hand or outside the search, it still counts against the goal); a saved plan with
    sparse attention is not a compiled ditplan plan, so the goal never rests on it."""
    fast = row("ditplan/target=2x", 1.96, 34.0, density=0.3, skipped=0.4)  # curve: 1.4x
    hand = row("plan-file/reuse-every-3rd", 1.9, 34.5, skipped=0.6)
    verdict = caching_gain([*CACHE_ONLY, hand, fast])
    assert verdict.met is False and "plan-file/reuse-every-3rd (1.90x, 34.50 dB)" in verdict.detail
    sparse_file = row("plan-file/sparse", 3.0, 34.0, density=0.3, skipped=0.4)
    assert caching_gain([*CACHE_ONLY, sparse_file]).met is None  # no compiled plan to judge
    dense_file = row("plan-file/dense-copy", 1.0, 40.0)  # skips nothing: not a caching plan
    assert caching_gain([*CACHE_ONLY, dense_file, fast]).met is True

def test_sparse_quality_reads_the_density_goal_row():
    def sparse(psnr, cosine, status="ok"):
        return row("ditplan-sparse-only/d=0.2", 1.4, psnr, cosine=cosine, density=0.3,
                   params={"density": 0.2}, status=status, layers=("blocks.2", "blocks.5"))

    others = [row("ditplan-sparse-only/d=0.5", 1.1, 45.0, params={"density": 0.5})]
    met = sparse_quality([*others, sparse(31.0, 0.985)])
    assert met.met is True
    assert met.detail == ("ditplan-sparse-only/d=0.2: cosine 0.9850, PSNR 31.00 dB, 1.40x "
                          "(sparse layers: blocks.2, blocks.5)")
    assert sparse_quality([sparse(29.9, 0.99)]).met is False
    assert sparse_quality([sparse(35.0, 0.97)]).met is False
    assert sparse_quality([sparse(None, 1.0)]).met is True  # every clip identical: PSNR inf
    assert sparse_quality(others).met is None
    failed = sparse_quality([sparse(None, None, status="not_applicable")])
    assert failed.met is None and "not_applicable: why" in failed.detail


def test_sparse_quality_quotes_every_layer_when_the_compiler_chose_none():
    chose_none = row("ditplan-sparse-only/d=0.2", None, None, params={"density": 0.2},
                     status="not_applicable")
    every = row("sparse-every-layer/d=0.2", 1.9, 24.5, cosine=0.97, density=0.25,
                params={"density": 0.2})
    verdict = sparse_quality([chose_none, every])
    assert verdict.met is None  # the goal is about the compiler's layers: never judged from all
    assert verdict.detail == ("ditplan-sparse-only/d=0.2: not_applicable: why; for comparison, "
                              "every layer sparse: sparse-every-layer/d=0.2: cosine 0.9700, "
                              "PSNR 24.50 dB, 1.90x")


def test_goal_lines_say_met_missed_or_not_measured():
    lines = goal_lines([*CACHE_ONLY])
    assert len(lines) == 2 and all("**not measured**" in line for line in lines)
    assert lines[0].startswith("- density 0.2 in the layers the compiler chooses: cosine to "
                               "dense >= 0.98 and PSNR >= 30 dB")


def test_profile_steps_of_the_suites():
    assert evenly_spaced(32, 8) == (0, 4, 9, 13, 18, 22, 27, 31)
    assert evenly_spaced(4, 8) == (0, 1, 2, 3) and evenly_spaced(5, 1) == (0,)
    assert LONG_SUITE.profile_settings(32) == {"mode": "sample", "map_steps": (),
                                               "attention_steps": evenly_spaced(32, 8),
                                               "output_error": True}  # its measured heads
    assert REFERENCE_SUITE.profile_settings(32) == {"mode": "auto", "output_error": False}
    long = LONG_SUITE.full
    assert (long.frames, long.height, long.width, long.steps) == (32, 64, 64, 32)
    assert long.guidance_scale == 4.0
    assert math.prod((long.frames, long.height // 2, long.width // 2)) == 32_768


def test_layer_choice_densities():
    choice = LayerChoice(("blocks.0", "blocks.1", "blocks.2"), ("blocks.1",))
    assert choice.densities(0.1) == {"blocks.0": 1.0, "blocks.1": 0.1, "blocks.2": 1.0}


def test_measured_plans_lend_a_rows_measurements_to_the_same_plan():
    from benchmarks.quality.harness import MEASURED_FIELDS, MeasuredPlans

    measured = {k: 1.0 for k in MEASURED_FIELDS}
    first = {"method": "ditplan/target=2x", "status": "ok", "plan_key": "abc", **measured}
    copied = {"method": "ditplan-cache-only/target=2x", "status": "ok", "plan_key": "abc",
              "same_plan_as": "ditplan/target=2x", **measured}
    failed = {"method": "ditplan/fast", "status": "failed", "plan_key": "def"}
    plans = MeasuredPlans([first, copied, failed])  # a resumed run's rows
    assert plans.reuse("abc") == {**measured, "same_plan_as": "ditplan/target=2x"}
    assert plans.reuse("def") is None and plans.reuse(None) is None  # failed rows lend nothing
    plans.add({"method": "x/y", "status": "ok", "plan_key": "def", **measured})
    assert plans.reuse("def")["same_plan_as"] == "x/y"
