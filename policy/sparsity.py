"""Per-layer (and per-head) attention density from profiled recall-vs-density curves.

A layer gets the smallest density whose block-mean-PREDICTED mask keeps at least
``recall_target`` of the attention mass at the ``recall_quantile`` over the profiled prompts and
(sparse) steps. Between grid points the recall curve is interpolated linearly: top-k mass is a
concave function of k (a sum of sorted shares), so the chord lies below the curve and the
interpolated density is never smaller than the true one (for the predicted mask, whose ranking
is nearly the oracle's on well-predicted layers, this holds approximately). Densities are then
rounded up to 0.01. With ``mixed_heads``, a head whose recall never reaches the target keeps
density 1.0 while the layer's other heads run sparse (heads are often bimodal: some attend
locally, some to everything).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ditplan.policy.config import CompilerConfig
from ditplan.policy.load_profile import Profile

DENSE = 1.0


@dataclass(frozen=True)
class LayerSparsity:
    """A layer's chosen density (1.0: dense), optional per-head densities, and why."""

    density: float
    head_densities: tuple[float, ...] | None
    reason: str


def required_density(recall: np.ndarray, grid: np.ndarray, target: float) -> float | None:
    """Smallest density whose (interpolated) recall reaches ``target``.

    Args:
        recall: [D] recall at each grid density (made monotone here).
        grid: [D] increasing densities.
        target: mass share to keep.
    Returns:
        the density rounded up to 0.01, or None when even the largest grid density falls short.
    """
    recall = np.maximum.accumulate(np.asarray(recall, dtype=np.float64))
    xs, ys = np.concatenate([[0.0], grid]), np.concatenate([[0.0], recall])
    above = np.nonzero(ys >= target)[0]
    if len(above) == 0:
        return None
    i = int(above[0])
    if i == 0:
        return float(grid[0])
    frac = (target - ys[i - 1]) / (ys[i] - ys[i - 1])
    density = xs[i - 1] + frac * (xs[i] - xs[i - 1])
    return min(float(xs[i]), math.ceil(round(density * 100, 6)) / 100)


def expected_recall(curve: np.ndarray, grid: np.ndarray, density: float) -> float:
    """Mean recall at ``density`` by interpolating ``curve`` [D] through (0, 0) and (1, 1)."""
    xs = np.concatenate([[0.0], grid, [1.0]])
    ys = np.concatenate([[0.0], np.maximum.accumulate(curve), [1.0]])
    return float(np.interp(density, xs, ys))


def choose_sparsity(profile: Profile, layer: int, config: CompilerConfig,
                    sparse_steps: np.ndarray) -> LayerSparsity:
    """Choose block ``profile.blocks[layer]``'s density from its recall on ``sparse_steps``.

    Args:
        profile: the loaded traces.
        layer: index into profile.blocks.
        config: recall target and quantile, prediction-quality floor, head spread.
        sparse_steps: [T] bool, steps where the layer will run sparse.
    Returns:
        the LayerSparsity (dense when no grid density meets the target or prediction is poor).
    """
    block = profile.blocks[layer]
    override = config.densities.get(block, config.fixed_density)
    if override is not None:
        return LayerSparsity(float(override), None, "override")
    keep = sparse_steps[profile.sample_step]
    if not keep.any():
        return LayerSparsity(DENSE, None, "no sparse steps")
    pred = profile.recall_predicted[layer][..., keep]  # pred: [H, D, N']
    oracle = profile.recall_oracle[layer][..., keep]
    q, grid, target = config.recall_quantile, profile.densities, config.recall_target
    density = required_density(np.quantile(pred.mean(axis=0), q, axis=-1), grid, target)
    heads = [required_density(np.quantile(h, q, axis=-1), grid, target) for h in pred]
    if config.mixed_heads and None in heads:
        return _mixed_heads(pred, oracle, grid, heads, config)
    if density is None:
        return LayerSparsity(DENSE, None, f"predicted recall < {target} at density {grid[-1]}")
    ratio = _prediction_ratio(pred, oracle, grid, density)
    if ratio < config.min_prediction_ratio:
        return LayerSparsity(DENSE, None, f"poor prediction (predicted/oracle {ratio:.2f})")
    if None in heads or max(heads) - min(heads) <= config.head_spread:
        return LayerSparsity(density, None, "layer")
    return LayerSparsity(max(heads), tuple(heads), "per head")


def _mixed_heads(pred: np.ndarray, oracle: np.ndarray, grid: np.ndarray,
                 heads: list[float | None], config: CompilerConfig) -> LayerSparsity:
    """Heads that reach the target at their own density, the others dense (1.0).

    Args:
        pred, oracle: [H, D, N'] recall of the layer's heads on its sparse steps.
        heads: each head's required density, None where no grid density reaches the target.
    """
    sparse = [h for h, d in enumerate(heads) if d is not None]
    if not sparse:
        return LayerSparsity(DENSE, None, f"no head's predicted recall reaches "
                                          f"{config.recall_target} at density {grid[-1]}")
    ratio = _prediction_ratio(pred[sparse], oracle[sparse], grid,
                              max(heads[h] for h in sparse))
    if ratio < config.min_prediction_ratio:
        return LayerSparsity(DENSE, None, f"poor prediction (predicted/oracle {ratio:.2f})")
    per_head = tuple(DENSE if d is None else d for d in heads)
    return LayerSparsity(max(per_head), per_head,
                         f"per head, {len(heads) - len(sparse)} of {len(heads)} dense")


def _prediction_ratio(pred: np.ndarray, oracle: np.ndarray, grid: np.ndarray,
                      density: float) -> float:
    """Mean predicted / mean oracle recall at the first grid density >= ``density``."""
    d = int(np.searchsorted(grid, density - 1e-9))
    d = min(d, len(grid) - 1)
    return float(pred[:, d].mean() / max(oracle[:, d].mean(), 1e-12))


def layer_recall_curve(profile: Profile, layer: int, sparse_steps: np.ndarray) -> np.ndarray:
    """Mean predicted recall [H, D] of a layer over the samples at ``sparse_steps``."""
    keep = sparse_steps[profile.sample_step]
    return profile.recall_predicted[layer][..., keep].mean(axis=-1)
