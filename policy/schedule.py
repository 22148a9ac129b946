"""Warm-up length, cache refresh schedules (ProfilingDiT Eq. 15) and cache groups (networkx).

Step-change curves ``c[s]`` compare step s with step s - 1 (c[0] is NaN). The mid-run plateau
is the median of c over the middle half of the steps; the warm-up ends after the last step in the
first half whose change exceeds (1 + settle_tolerance) x plateau. After the warm-up, background
runs are refreshed on steps spaced T_s = T_max - (T_max - T_min)(s - s0)/(S - s0) apart, and late
steps whose change rises above late_rise_factor x plateau are always computed.
"""

from __future__ import annotations

import math

import networkx as nx
import numpy as np

from ditplan.policy.config import CompilerConfig


def plateau(curve: np.ndarray) -> float:
    """Median change [scalar] over the middle half of the steps of ``curve`` [T]."""
    steps = len(curve)
    middle = curve[max(1, steps // 4): max(2, (3 * steps + 3) // 4)]
    middle = middle[~np.isnan(middle)]
    return float(np.median(middle)) if len(middle) else 0.0


def settle_step(curve: np.ndarray, tolerance: float) -> int:
    """First step index from which ``curve`` [T] stays near its plateau through mid-run."""
    level = (1.0 + tolerance) * plateau(curve)
    first_half = np.nan_to_num(curve[: (len(curve) + 1) // 2], nan=0.0)
    high = np.nonzero(first_half > level)[0]
    return int(high[-1]) + 1 if len(high) else 1


def warmup_steps(curves: list[np.ndarray], steps: int, config: CompilerConfig) -> int:
    """Dense/computed warm-up length: the latest settle step of ``curves`` (each [T]), clamped to
    [ceil(warmup_min_fraction * T), floor(warmup_max_fraction * T)] and to at least 1."""
    settle = max(settle_step(c, config.settle_tolerance) for c in curves)
    low = max(1, math.ceil(config.warmup_min_fraction * steps))
    high = max(low, math.floor(config.warmup_max_fraction * steps))
    return int(min(max(settle, low), high, steps))


def refresh_steps(steps: int, warmup: int, t_max: int, t_min: int) -> list[int]:
    """Refresh steps from ``warmup`` on, intervals shrinking linearly from t_max to t_min."""
    out, s = [], warmup
    while s < steps:
        out.append(s)
        interval = t_max - (t_max - t_min) * (s - warmup) / max(steps - warmup, 1)
        s += max(1, math.floor(interval + 0.5))
    return out


def compute_mask(curve: np.ndarray, warmup: int, config: CompilerConfig) -> tuple[bool, ...]:
    """Per-step compute mask [T] of a cache group for one CFG context's output-change curve."""
    steps = len(curve)
    mask = np.arange(steps) < warmup
    mask[refresh_steps(steps, warmup, config.t_max, config.t_min)] = True
    late = np.nan_to_num(curve, nan=0.0) > config.late_rise_factor * plateau(curve)
    late[: steps // 2] = False
    return tuple(bool(m) for m in mask | late)


def branches_differ(curves: np.ndarray, tolerance: float) -> bool:
    """True when the CFG contexts' change curves ``curves`` [C, T] differ by more than
    ``tolerance`` (mean absolute gap relative to their mean level)."""
    if len(curves) < 2:
        return False
    valid = curves[:, 1:]
    gap = np.abs(valid[0] - valid[1]).mean()
    return bool(gap > tolerance * max(valid.mean(), 1e-12))


def cache_groups(blocks: tuple[str, ...], roles: dict[str, str]) -> list[tuple[str, ...]]:
    """Maximal runs of consecutive background blocks, in execution order.

    Blocks form a path in execution order; an edge joins neighbours of the same container
    (``blocks.3`` -> ``blocks.4``, but not ``transformer_blocks.19`` ->
    ``single_transformer_blocks.0``, whose hidden states differ), so one residual never spans
    a stream change. Each connected background component of that path is one group.
    """
    graph = nx.Graph()
    graph.add_nodes_from(blocks)
    graph.add_edges_from(
        (a, b) for a, b in zip(blocks[:-1], blocks[1:], strict=True)
        if a.rsplit(".", 1)[0] == b.rsplit(".", 1)[0]
    )
    background = graph.subgraph(b for b in blocks if roles[b] == "background")
    position = {b: i for i, b in enumerate(blocks)}
    groups = [tuple(sorted(c, key=position.get)) for c in nx.connected_components(background)]
    return sorted(groups, key=lambda g: position[g[0]])
