"""Step masks as cached read-only arrays (a search prices ~10^5 candidates built from few)."""

from __future__ import annotations

import functools

import numpy as np

from ditplan.policy.plan import COMPUTE


@functools.lru_cache(maxsize=65536)
def computed(actions: str) -> np.ndarray:
    """[T] bool: where a run's per-step ``actions`` (e.g. "CCRF") compute."""
    return _frozen(np.array([a == COMPUTE for a in actions], dtype=bool))


@functools.lru_cache(maxsize=4096)
def sparse_steps(dense_steps: tuple[int, ...], steps: int) -> np.ndarray:
    """[steps] bool: the steps outside ``dense_steps``."""
    return _frozen(~np.isin(np.arange(steps), dense_steps))


def _frozen(array: np.ndarray) -> np.ndarray:
    array.flags.writeable = False
    return array
