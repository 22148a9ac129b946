"""Forecast histories: TaylorSeer's finite differences and Newton's polynomial extrapolation."""

from __future__ import annotations

import pytest
import torch

from ditplan.policy.plan import BlockRun, PlanError
from ditplan.runtime.cache import TaylorHistory

POSITIONS = (0.0, 1.0, 3.0, 4.0, 7.0)  # uneven gaps, as a searched schedule computes


def _quadratic(x: float) -> torch.Tensor:  # [1, 2, 3], a different quadratic per element
    a = torch.arange(6, dtype=torch.float64).reshape(1, 2, 3)
    return 0.5 + a * x - 0.05 * (a + 1) * x**2


def _filled(order: int, extrapolation: str) -> TaylorHistory:
    history = TaylorHistory(order, extrapolation)
    for x in POSITIONS:
        history.update(_quadratic(x), x)
    return history


@pytest.mark.parametrize("target", [8.0, 9.0, 10.5])
def test_newton_order_2_is_exact_on_a_quadratic_whatever_the_gaps(target):
    exact = _quadratic(target).float()
    newton = _filled(2, "newton").predict(target, torch.float32)
    taylor = _filled(2, "taylor").predict(target, torch.float32)
    torch.testing.assert_close(newton, exact, rtol=1e-5, atol=1e-5)  # float32 factors
    assert (taylor - exact).abs().max() > 0.1  # TaylorSeer's series misses the curvature


def test_order_1_is_the_same_line_both_ways():
    a, b = _filled(1, "newton"), _filled(1, "taylor")
    torch.testing.assert_close(a.predict(9.0, torch.float32), b.predict(9.0, torch.float32))


def test_taylor_on_even_gaps_matches_diffusers_update_rule():
    history = TaylorHistory(2, "taylor")
    values = [_quadratic(float(x)) for x in (0, 2, 4)]
    for x, v in zip((0.0, 2.0, 4.0), values, strict=True):
        history.update(v, x)
    first = (values[2] - values[1]) / 2
    second = (first - (values[1] - values[0]) / 2) / 2
    expected = values[2] + first * 1.0 + second * 1.0**2 / 2  # one step past the last compute
    torch.testing.assert_close(history.predict(5.0, torch.float64), expected.float().double(),
                               rtol=1e-6, atol=1e-6)


def test_a_run_refuses_an_unknown_extrapolation():
    with pytest.raises(PlanError, match="extrapolation must be one of"):
        BlockRun(("blocks.0",), {"cond": "CF"}, order=2, extrapolation="spline")
