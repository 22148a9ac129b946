"""The error model's ranking of step-level designs, corrected by what calibration measured."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ditplan.policy.plan import IDENTICAL_PSNR_DB, BlockRun

SkipKinds = tuple[str, ...]


def warmup_of(runs: Sequence[BlockRun]) -> int:
    """Steps every run computes before its first skip (the whole schedule without runs)."""
    leads = [len(a) - len(a.lstrip("C")) for r in runs for a in r.schedule.values()]
    return min(leads, default=0)


def skip_kinds(runs: Sequence[BlockRun]) -> SkipKinds:
    """What the runs do on skipped steps: "R" (reuse) or "F<order>" per run."""
    return tuple(f"F{r.order}" if r.forecasts else "R" for r in runs)


@dataclass(frozen=True)
class MeasuredOffsets:
    """PSNR predicted as ``intercept + warmup[w] + skip[k] - 20 log10(predicted error)``.

    A design's predicted error is a relative output error, so the PSNR it implies is a constant
    minus 20 log10 of it; what the constant is depends on what the error model misjudges most:
    how much the first steps matter (fitted to the 4x calibration on the long reference model, a
    warm-up of 4 steps sits 4 dB above what the model predicts from one of 2) and a reuse against
    a forecast (the model's prior charges a forecast's drift at 0.3-0.4 of a reuse's; on that
    model reuse measured 1-2 dB above forecasts on the same schedules; H200, BENCHMARKS.md,
    sessions 22 and 23). The offsets are fitted to the measured candidates; a warm-up or skip
    kind none of them had gets the mean offset of those measured.
    """

    intercept: float
    warmup: dict[int, float]
    skip: dict[SkipKinds, float]

    def psnr_db(self, runs: Sequence[BlockRun], error: float) -> float:
        """The PSNR (dB) predicted for a design with ``runs`` and predicted ``error``."""
        w = self.warmup.get(warmup_of(runs), _mean(self.warmup))
        k = self.skip.get(skip_kinds(runs), _mean(self.skip))
        return self.intercept + w + k - 20.0 * math.log10(max(error, 1e-12))

    def describe(self) -> str:
        """One line: the fitted offsets in dB."""
        warm = ", ".join(f"{w}: {v:+.1f}" for w, v in sorted(self.warmup.items()))
        kind = ", ".join(f"{'/'.join(k) or 'none'}: {v:+.1f}" for k, v in self.skip.items())
        return f"warm-up {warm}; skip kind {kind} (dB)"


def fit_offsets(points: Sequence[tuple[Sequence[BlockRun], float, float]]
                ) -> MeasuredOffsets | None:
    """Least-squares offsets from (runs, predicted error, measured PSNR dB) points; points
    whose clips were identical to dense, whose PSNR is not finite or whose predicted error is
    not finite and positive are left out. None when no point is left. With fewer points than
    offsets the smallest offsets that fit are taken (one point: the same constant for every
    design, so the ranking stays the error model's)."""
    kept = [(runs, e, p) for runs, e, p in points
            if 0 < e < math.inf and math.isfinite(p) and p < IDENTICAL_PSNR_DB]
    if not kept:
        return None
    warmups = sorted({warmup_of(r) for r, _, _ in kept})
    kinds = sorted({skip_kinds(r) for r, _, _ in kept})
    x = np.array([[1.0, *(float(warmup_of(r) == w) for w in warmups),
                   *(float(skip_kinds(r) == k) for k in kinds)] for r, _, _ in kept])  # [P, 1+W+K]
    y = np.array([p + 20.0 * math.log10(e) for _, e, p in kept])  # [P]
    coef = np.linalg.lstsq(x, y, rcond=None)[0]  # minimum norm where the points underdetermine it
    return MeasuredOffsets(float(coef[0]),
                           dict(zip(warmups, map(float, coef[1:1 + len(warmups)]), strict=True)),
                           dict(zip(kinds, map(float, coef[1 + len(warmups):]), strict=True)))


def _mean(offsets: dict) -> float:
    return sum(offsets.values()) / len(offsets)
