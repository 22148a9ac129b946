"""Which heads estimate their dropped key blocks: those whose profiled output error it lowers.

Estimating a dropped key block from its mean key and value (the runtime's ``estimate_heads``)
helps a head whose keys and values vary little inside a block and hurts one that attends to a
few tokens of a block (measured on the reference models: the same layer has heads of both kinds,
and neither recall nor entropy tells them apart). The profiler records, per head and density,
the output's relative error against dense both ways; a head estimates when, on its sparse
steps, the median error with the estimate is below (1 - ESTIMATE_MARGIN) x the median without.
"""

from __future__ import annotations

import numpy as np

from ditplan.policy.config import CompilerError
from ditplan.policy.load_profile import Profile

ESTIMATE_MARGIN = 0.05  # the estimate must cut the median error by at least this share


def median_errors(profile: Profile, layer: int, sparse_steps: np.ndarray) -> np.ndarray:
    """Median over the samples at ``sparse_steps`` of layer ``layer``'s output errors:
    [H, D, 2] (dropped blocks left out, estimated)."""
    if profile.output_error is None:
        raise CompilerError("these traces do not record the sparse output's error, which "
                            "--estimate-dropped measured reads: profile with `ditplan profile "
                            "--output-error`, or estimate in every sparse head "
                            "(--estimate-dropped all)")
    keep = sparse_steps[profile.sample_step]
    return np.median(profile.output_error[layer][:, :, keep], axis=2)


def estimate_heads(profile: Profile, layer: int, densities: tuple[float, ...],
                   sparse_steps: np.ndarray, mode: str = "measured") -> tuple[bool, ...] | None:
    """Per head: estimate the dropped key blocks at that head's density (1.0: dense, never).

    Args:
        profile: the loaded traces (with output errors for ``mode`` "measured").
        layer: index into profile.blocks.
        densities: [H] each head's density.
        sparse_steps: [T] bool, steps where the layer runs sparse.
        mode: "measured" (where the profiled error drops) or "all" (every sparse head).

    Returns:
        H flags, or None when no head estimates.
    """
    if mode == "all":
        flags = [density < 1.0 for density in densities]
        return tuple(flags) if any(flags) else None
    errors = median_errors(profile, layer, sparse_steps)  # [H, D, 2]
    grid = profile.densities
    flags = []
    for head, density in enumerate(densities):
        if density >= 1.0:
            flags.append(False)
            continue
        dropped, estimated = (np.interp(density, grid, errors[head, :, i]) for i in (0, 1))
        flags.append(bool(estimated < (1.0 - ESTIMATE_MARGIN) * dropped))
    return tuple(flags) if any(flags) else None
