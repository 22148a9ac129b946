"""A block run's schedule replayed on recorded values: what the runtime would emit at each step.

The numpy twin of runtime/cache.py's TaylorHistory (TaylorSeer's finite differences), run
open-loop on the dense trajectory's values: computed steps emit the value itself, reused steps
the last computed value, forecast steps the Taylor polynomial of the last computed steps.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from ditplan.policy.plan import COMPUTE, FORECAST, REUSE


def replay(values: np.ndarray, actions: str, order: int,
           positions: Sequence[float] | None = None) -> np.ndarray:
    """What a run emits at each step when its true value at step t is ``values[t]``.

    Args:
        values: [T, ...] the run's value (residual or output) at every step, dense.
        actions: one letter per step, "C", "R" or "F" (the first must be "C").
        order: the Taylor order of forecasts (1 or 2); a run without forecasts keeps only
            its last value, as the runtime does.
        positions: the forecast variable at each step (sigmas); None: the step index.
    Returns:
        [T, ...] the emitted values (equal to ``values`` on computed steps).
    """
    if len(actions) != len(values) or not actions.startswith(COMPUTE):
        raise ValueError(f"need one action per step starting with {COMPUTE!r}: {len(values)} "
                         f"values, actions {actions!r}")
    order = order if FORECAST in actions else 0
    where = np.arange(len(values), dtype=np.float64) if positions is None else positions
    out = np.empty_like(values)
    factors: list[np.ndarray] = []
    last: float | None = None
    for step, action in enumerate(actions):
        position = float(where[step])
        if action == COMPUTE:
            new = [values[step]]
            if order and last is not None:
                gap = position - last
                for previous in factors[:order]:
                    new.append((new[-1] - previous) / gap)
            factors = new
            last = position if order else last
            out[step] = values[step]
        elif action == REUSE or not order:
            out[step] = factors[0]
        elif action == FORECAST:
            offset = position - last
            out[step] = sum(f * (offset**k / math.factorial(k)) for k, f in enumerate(factors))
        else:
            raise ValueError(f"unknown action {action!r} in {actions!r}")
    return out
