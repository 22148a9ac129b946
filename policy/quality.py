"""Predicted error of a plan: a ranking proxy built from the profiled traces.

Per block evaluation (block x step x CFG context) the proxy adds: on sparse steps, the attention
mass the layer's mask is expected to lose (1 - mean predicted recall at its density); on reuse
steps, the relative-L1 change the skipped blocks' residuals accumulate since the group's last
refresh. The total is divided by the number of block evaluations. It orders candidate plans by
expected damage; it is not a pixel metric (PSNR/LPIPS need a run).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from ditplan.policy.load_profile import Profile
from ditplan.policy.plan import AttentionSpec, CacheGroup
from ditplan.policy.sparsity import expected_recall, layer_recall_curve


def attention_loss(profile: Profile, layer: int, spec: AttentionSpec) -> float:
    """Expected lost mass share [scalar] of block ``layer`` on its sparse steps."""
    if spec.is_dense or spec.density is None:
        return 0.0
    sparse_steps = ~np.isin(np.arange(profile.steps), spec.dense_steps)
    if not sparse_steps[profile.sample_step].any():
        return 0.0
    curves = layer_recall_curve(profile, layer, sparse_steps)  # curves: [H, D]
    if spec.head_densities is None:
        return 1.0 - expected_recall(curves.mean(axis=0), profile.densities, spec.density)
    recalls = [expected_recall(c, profile.densities, d)
               for c, d in zip(curves, spec.head_densities, strict=True)]
    return 1.0 - float(np.mean(recalls))


def reuse_drift(profile: Profile, group: CacheGroup, context: str) -> float:
    """Sum over steps of the residual change accumulated since the last refresh [scalar]."""
    index = {b: i for i, b in enumerate(profile.blocks)}
    c = profile.contexts.index(context)
    change = profile.residual_change[c, [index[b] for b in group.blocks]].mean(axis=0)  # [T]
    total, accumulated = 0.0, 0.0
    for step, computed in enumerate(group.compute_mask(context)):
        accumulated = 0.0 if computed else accumulated + float(np.nan_to_num(change[step]))
        total += accumulated
    return total


def predicted_error(profile: Profile, specs: Mapping[str, AttentionSpec],
                    groups: Sequence[CacheGroup]) -> float:
    """Mean damage proxy per block evaluation of a candidate plan (see module docstring).

    Args:
        profile: the loaded traces.
        specs: block FQN -> AttentionSpec for every block.
        groups: the plan's cache groups.
    Returns:
        the predicted error (>= 0).
    """
    steps, contexts = profile.steps, profile.contexts
    total = 0.0
    for layer, block in enumerate(profile.blocks):
        spec = specs[block]
        sparse = 0 if spec.is_dense else steps - len(spec.dense_steps)
        total += attention_loss(profile, layer, spec) * sparse * len(contexts)
    for group in groups:
        total += sum(reuse_drift(profile, group, c) for c in contexts) * len(group.blocks)
    return max(total, 0.0) / (len(profile.blocks) * steps * len(contexts))
