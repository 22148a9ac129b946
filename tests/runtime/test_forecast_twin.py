"""policy.forecast.replay (numpy) emits what the runtime's TaylorHistory emits, step by step."""

import numpy as np
import pytest
import torch

from ditplan.policy.forecast import replay
from ditplan.runtime.cache import TaylorHistory


def runtime_replay(values: np.ndarray, actions: str, order: int, positions) -> np.ndarray:
    """The runtime's history driven by the same schedule (float64 values in, float64 out)."""
    forecasts = "F" in actions
    history = TaylorHistory(order if forecasts else 0)
    out = []
    for step, action in enumerate(actions):
        value = torch.from_numpy(values[step])[None]  # [1, S, C]
        if action == "C":
            history.update(value, float(positions[step]))
            out.append(value)
        elif action == "R":
            out.append(history.factors[0].double())
        else:
            out.append(history.predict(float(positions[step]), torch.float64))
    return torch.cat(out).numpy()


@pytest.mark.parametrize("order", [1, 2])
@pytest.mark.parametrize("seed", range(6))
def test_replay_matches_taylor_history(order, seed):
    rng = np.random.default_rng(seed)
    steps = 12
    values = rng.standard_normal((steps, 5, 3))
    actions = "C" + "".join(rng.choice(list("CCRF"), steps - 1))
    positions = np.sort(rng.uniform(0, 1, steps))[::-1] if seed % 2 else np.arange(steps)
    expected = runtime_replay(values, actions, order, positions)
    got = replay(values, actions, order, None if seed % 2 == 0 else positions)
    # the runtime keeps forecasting factors in float32: agreement to float32 rounding
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
    computed = [i for i, a in enumerate(actions) if a == "C"]
    np.testing.assert_array_equal(got[computed], values[computed])


def test_forecast_of_a_polynomial_is_exact_at_its_order():
    t = np.arange(10, dtype=np.float64)
    quadratic = (0.5 * t**2 - 2 * t + 3)[:, None]
    got = replay(quadratic, "CCCFCFFCFF", order=2)
    # TaylorSeer's differences are backward: exact for a line at order 1, close at order 2
    line = (3 * t - 1)[:, None]
    np.testing.assert_allclose(replay(line, "CCFFCFFFCF", order=1), line, atol=1e-12)
    assert np.abs(got - quadratic).max() < np.abs(replay(quadratic, "CCCFCFFCFF", 1)
                                                   - quadratic).max()


def test_replay_refuses_a_schedule_that_does_not_start_computing():
    with pytest.raises(ValueError, match="starting with"):
        replay(np.zeros((3, 1)), "FCC", order=1)
