"""Predicted error of a plan: a ranking proxy built from the profiled traces.

Per block evaluation (block x step x CFG context) the proxy adds: on the sparse steps the block
computes (not those its run reuses or forecasts), the relative error of the layer's attention
output at its heads' densities as the profiler measured it (``ditplan profile
--output-error``; with the dropped key blocks estimated in the heads that estimate them), or
without that measurement the attention mass the layer's mask is expected to
lose (1 - mean predicted recall at its density), which overstates the damage (long reference
model, density 0.2: lost mass 0.16, output error 0.045) and so steers the search away from
sparse attention; on steps a run skips, the relative-L1 change its blocks' residuals accumulate
since the run last computed, times a prior for the skip kind (SKIP_ERROR: a forecast follows the
trend, so it drifts less than a reuse, but its extrapolation error also grows with the steps
since the last compute: times that count). Each CFG branch is weighted by its share of the
guided output (w and w - 1 of 2w - 1). The total is divided by the number of block evaluations.
It orders candidate plans; it is not a pixel metric: ``compile-policy --calibrate`` measures
PSNR by running the best candidates.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from ditplan.policy.estimate import median_errors
from ditplan.policy.load_profile import Profile
from ditplan.policy.masks import computed, sparse_steps
from ditplan.policy.plan import COMPUTE, FORECAST, AttentionSpec, BlockRun
from ditplan.policy.search import run_curve
from ditplan.policy.sparsity import expected_recall, layer_recall_curve


def attention_loss(profile: Profile, layer: int, spec: AttentionSpec) -> float:
    """Expected damage [scalar] of block ``layer``'s attention on its sparse steps: the profiled
    relative output error where the traces record it, else the lost mass share."""
    if spec.is_dense or spec.density is None:
        return 0.0
    sparse = sparse_steps(spec.dense_steps, profile.steps)  # [T] bool
    if not sparse[profile.sample_step].any():
        return 0.0
    if profile.output_error is not None:
        return output_error_loss(profile, layer, spec, sparse)
    curves = layer_recall_curve(profile, layer, sparse)  # curves: [H, D]
    if spec.head_densities is None:
        return 1.0 - expected_recall(curves.mean(axis=0), profile.densities, spec.density)
    recalls = [expected_recall(c, profile.densities, d)
               for c, d in zip(curves, spec.head_densities, strict=True)]
    return 1.0 - float(np.mean(recalls))


def output_error_loss(profile: Profile, layer: int, spec: AttentionSpec,
                      sparse_steps: np.ndarray) -> float:
    """Mean over heads of the profiled relative output error [scalar] at each head's density,
    on ``sparse_steps`` [T] bool (median over samples; dropped blocks estimated where the head
    estimates them), interpolated through (0, 1) and (1, 0) and non-increasing in density."""
    errors = median_errors(profile, layer, sparse_steps)  # [H, D, 2]
    heads = errors.shape[0]
    densities = spec.head_densities or (spec.density,) * heads
    estimate = spec.estimate_heads or (False,) * heads
    xs = np.concatenate([[0.0], profile.densities, [1.0]])
    losses = []
    for head, (density, estimated) in enumerate(zip(densities, estimate, strict=True)):
        curve = errors[head, :, int(estimated)]  # [D]
        ys = np.concatenate([[1.0], np.minimum.accumulate(curve), [0.0]])
        losses.append(float(np.interp(density, xs, ys)))
    return float(np.mean(losses))


# Drift of a skipped step relative to reusing the last value, by skip kind (a prior that
# calibration checks; TaylorSeer reports order-1 forecasts several times closer than reuse).
SKIP_ERROR = {"R": 1.0, "F1": 0.4, "F2": 0.3}


def cfg_weights(profile: Profile) -> dict[str, float]:
    """Share of each CFG context in the guided output u + w (c - u): w and |w - 1|, normalized."""
    if len(profile.contexts) == 1:
        return {profile.contexts[0]: 1.0}
    w = profile.metadata.workload.guidance_scale
    cond, uncond = abs(w), abs(w - 1.0)
    return {"cond": cond / (cond + uncond), "uncond": uncond / (cond + uncond)}


def run_drift(profile: Profile, run: BlockRun, context: str) -> float:
    """Sum over skipped steps of the change accumulated since the run last computed [scalar],
    each weighted by its skip kind's prior."""
    change = run_curve(profile, run.blocks, profile.contexts.index(context))  # [T]
    kind = {FORECAST: f"F{run.order}"}
    total, accumulated, gap = 0.0, 0.0, 0
    for step, action in enumerate(run.actions(context)):
        if action == COMPUTE:
            accumulated, gap = 0.0, 0
            continue
        accumulated += float(change[step])
        gap += 1
        # a forecast's extrapolation error grows with its distance from the last compute
        stretch = gap if action == FORECAST else 1
        total += accumulated * SKIP_ERROR[kind.get(action, action)] * stretch
    return total


def predicted_error(profile: Profile, specs: Mapping[str, AttentionSpec],
                    runs: Sequence[BlockRun]) -> float:
    """Mean damage proxy per block evaluation of a candidate plan (see module docstring).

    Args:
        profile: the loaded traces.
        specs: block FQN -> AttentionSpec for every block.
        runs: the plan's block runs.
    Returns:
        the predicted error (>= 0): attention_error + runs_error.
    """
    return attention_error(profile, specs, attention_losses(profile, specs), runs) + runs_error(
        profile, runs)


def attention_losses(profile: Profile, specs: Mapping[str, AttentionSpec]) -> dict[str, float]:
    """Each sparse block's attention_loss (the costly part of attention_error: a search
    computes it once per attention setting, for every run choice)."""
    return {block: attention_loss(profile, layer, specs[block])
            for layer, block in enumerate(profile.blocks) if not specs[block].is_dense}


def attention_error(profile: Profile, specs: Mapping[str, AttentionSpec],
                    losses: Mapping[str, float], runs: Sequence[BlockRun]) -> float:
    """The sparse attention share of predicted_error (>= 0): each sparse block's loss
    (``losses``, from attention_losses) on every step it computes sparse, in each context (a
    step its run reuses or forecasts runs no attention)."""
    run_of = {b: r for r in runs for b in r.blocks}
    total = 0.0
    for block, loss in losses.items():
        sparse = sparse_steps(specs[block].dense_steps, profile.steps)  # [T]
        run = run_of.get(block)
        for context in profile.contexts:
            count = (sparse.sum() if run is None else
                     np.count_nonzero(sparse & computed(run.actions(context))))
            total += loss * int(count)
    return total / _evaluations(profile)


def runs_error(profile: Profile, runs: Sequence[BlockRun]) -> float:
    """The skipped steps' share of predicted_error (>= 0)."""
    weights, contexts = cfg_weights(profile), profile.contexts
    total = 0.0
    for run in runs:
        drift = sum(run_drift(profile, run, c) * weights[c] * len(contexts) for c in contexts)
        total += drift * len(run.blocks)
    return max(total, 0.0) / _evaluations(profile)


def _evaluations(profile: Profile) -> int:
    """Block evaluations of a dense run: blocks x steps x CFG contexts."""
    return len(profile.blocks) * profile.steps * len(profile.contexts)
