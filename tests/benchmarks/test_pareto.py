"""The table's comparison at matched speedups: interpolated curves, +1 dB margin."""

import pytest

from benchmarks.quality.pareto import matched, not_dominated, psnr_at

CURVES = {
    "ditplan-calibrated": [(1.55, 42.0, "a"), (2.05, 37.0, "b")],
    "diffusers-taylorseer": [(1.41, 45.0, "w12"), (1.51, 43.0, "w8"), (2.25, 35.0, "i3")],
    "dense": [(1.0, 99.0, "repeat")],
}


def test_psnr_at_interpolates_and_knows_its_range():
    points = CURVES["diffusers-taylorseer"]
    assert psnr_at(points, 1.46) == pytest.approx(44.0)
    assert psnr_at(points, 1.2) == 45.0  # slower than every point: the best of them
    assert psnr_at(points, 2.3) is None  # faster than every point


def test_matched_compares_the_curves_at_each_speedup():
    lines = matched(CURVES, speedups=(1.5, 2.0, 2.5))
    assert lines[0] == "1.5x: ditplan 42.00 dB; diffusers-taylorseer 43.20 (-1.20)"
    assert lines[1] == "2x: ditplan 37.50 dB; diffusers-taylorseer 37.70 (-0.20)"
    assert lines[2] == "2.5x: no ditplan plan measured this fast"


def test_not_dominated_asks_for_the_margin_at_the_other_methods_points():
    lines = not_dominated(CURVES, min_speedup=1.5, margin_db=1.0)
    assert lines == [
        "diffusers-taylorseer/w8: 1.51x at 43.00 dB: ditplan's best curve there is 42.00 dB "
        "(-1.00)",
        "diffusers-taylorseer/i3: 2.25x at 35.00 dB: no ditplan plan is that fast"]
    assert not_dominated({**CURVES, "diffusers-taylorseer": [(2.0, 36.0, "x")]}) == []
