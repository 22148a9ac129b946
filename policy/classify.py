"""Foreground/background block roles from per-layer foreground statistics (ProfilingDiT §3.1).

Instead of a hand-set R_attn threshold, each layer gets a foreground score (the mean z-score of
FOREGROUND_FEATURES across layers) and a two-component 1-D Gaussian mixture splits the scores;
the decision boundary is where the two weighted component densities cross between their means.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
from sklearn.mixture import GaussianMixture
from sklearn.preprocessing import StandardScaler

from ditplan.policy.config import CompilerConfig, CompilerError
from ditplan.policy.load_profile import FOREGROUND_FEATURES, Profile
from ditplan.policy.plan import RoleClassification

logger = logging.getLogger(__name__)

METHOD = "gaussian_mixture_2_on_mean_zscore"
_FLAT = 1e-9  # score spread below this: layers are indistinguishable, all stay foreground


@dataclass(frozen=True)
class RoleDecision:
    """Final roles (overrides applied) and the classifier's record for the provenance."""

    roles: dict[str, str]
    classification: RoleClassification


def foreground_scores(profile: Profile) -> np.ndarray:
    """Returns the per-layer foreground score [L]: mean z-score of FOREGROUND_FEATURES."""
    x = np.stack([profile.features[f] for f in FOREGROUND_FEATURES], axis=1)  # x: [L, F]
    return StandardScaler().fit_transform(x).mean(axis=1)


def decision_boundary(scores: np.ndarray) -> float | None:
    """Fit a 2-component 1-D GMM (random_state=0) to ``scores`` [L] and return the crossing
    point of the weighted component densities between the two means (None if scores are flat).
    """
    if len(scores) < 2 or np.ptp(scores) < _FLAT:
        return None
    gmm = GaussianMixture(n_components=2, random_state=0, n_init=3).fit(scores[:, None])
    order = np.argsort(gmm.means_[:, 0])
    mean = gmm.means_[order, 0]
    var = gmm.covariances_.reshape(-1)[order]
    weight = gmm.weights_[order]

    def log_ratio(x: float) -> float:  # log(w1 N(x; m1, v1)) - log(w0 N(x; m0, v0))
        l0, l1 = (math.log(weight[i]) - 0.5 * math.log(var[i]) - (x - mean[i]) ** 2 / (2 * var[i])
                  for i in (0, 1))
        return l1 - l0

    lo, hi = float(mean[0]), float(mean[1])
    if not log_ratio(lo) < 0 < log_ratio(hi):
        return (lo + hi) / 2
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if log_ratio(mid) < 0 else (lo, mid)
    return (lo + hi) / 2


def classify_roles(profile: Profile, config: CompilerConfig) -> RoleDecision:
    """Decide each block's role; config.all_roles / config.roles override the classifier.

    Returns:
        roles keyed by block FQN, plus the boundary and per-layer margins (score - boundary).
    """
    scores = foreground_scores(profile)
    boundary = decision_boundary(scores)
    margins = scores - boundary if boundary is not None else np.zeros_like(scores)
    roles = {b: ("foreground" if m > 0 or boundary is None else "background")
             for b, m in zip(profile.blocks, margins, strict=True)}
    unknown = sorted(set(config.roles) - set(profile.blocks))
    if unknown:
        raise CompilerError(f"role override for unknown blocks {unknown}; the model has "
                            f"{profile.blocks[0]} .. {profile.blocks[-1]}")
    if config.all_roles is not None:
        roles = dict.fromkeys(profile.blocks, config.all_roles)
    roles.update(config.roles)
    logger.debug("roles (boundary %s): %s", boundary, roles)
    record = RoleClassification(
        method=METHOD, features=FOREGROUND_FEATURES, decision_boundary=boundary,
        margins={b: float(m) for b, m in zip(profile.blocks, margins, strict=True)},
    )
    return RoleDecision(roles=roles, classification=record)
