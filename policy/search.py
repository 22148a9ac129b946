"""The plan space the compiler searches: block runs x step schedules x CFG reuse x sparsity.

A ``RunChoice`` describes one family member: which blocks form the run ("stack": every block,
"tail": all but the first, as FirstBlockCache; "model": the whole transformer call, embeddings
and head too, forecasting the model's output; background runs come from the preset designs),
what a skipped step does (reuse, or a Taylor forecast of order 1 or 2), and where the computed
steps go. Steps are placed from the traces, not at fixed intervals: after the warm-up, change is
accumulated along the run's profiled step-change curve and the run computes whenever skipping
once more would take the accumulated change past ``threshold`` (or after ``max_skip`` skips in a
row); the last ``cooldown`` steps always compute. With ``uncond_every`` = k > 1 the
unconditional branch computes only every k-th of those steps (CFG reuse).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np

from ditplan.policy.load_profile import Profile
from ditplan.policy.plan import COMPUTE, FORECAST, REUSE, BlockRun

SCOPES = ("stack", "tail", "model")
# A "model" run skips whole calls: on the reference model (H200, 16 calibration captions) its
# output forecasts kept 0.3-0.6 dB more than the stack's residual forecasts on the same
# schedules and ran 2.4-3.8% faster (BENCHMARKS.md, session 8 probe)
# (skip action, forecast order, extrapolation) searched; order 1 is the same line both ways
SKIP_KINDS = ((REUSE, 1, "taylor"), (FORECAST, 1, "taylor"), (FORECAST, 2, "taylor"))
# Newton's order 2, the quadratic through the last three computes, is searched when asked
# (CompilerConfig.search_newton): on the reference model it kept +1.1 dB over TaylorSeer's order
# 2 on the uneven 1.5x schedule in a CPU probe (8 x 32 x 32), but at the benchmark's workload
# (H200, 16 x 48 x 48) it lost in 9 of 10 measured pairs, by up to 2.3 dB (BENCHMARKS.md)
NEWTON_KIND = (FORECAST, 2, "newton")
# Forecast variables: the step index (TaylorSeer), and, when asked (CompilerConfig.search_sigma)
# and the traces record it, sigma. On the reference model's shifted flow schedule every sigma
# forecast measured 1-3 dB under its step-index twin (2-core CPU, 16 steps; BENCHMARKS.md), so
# sigma is not searched by default.
VARIABLES = ("step", "sigma")
# x the curve's mid-run plateau; inf: fixed intervals (max_skip + 1) after the warm-up, as
# TaylorSeer and FirstBlockCache-style schedules
THRESHOLD_SCALES = (0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, math.inf)
MAX_SKIPS = (1, 2, 3, 4, 5)
UNCOND_EVERY = (1, 2)
COOLDOWNS = (0, 1)
# searched besides the warm-up the traces settle at; long warm-ups matter: on the reference
# model TaylorSeer with 8 instead of 4 warm-up steps of 32 gained 5 dB for 10% speed (H200)
WARMUP_FRACTIONS = (0.05, 0.1, 0.2, 0.25, 0.3, 0.35, 0.4)


@dataclass(frozen=True)
class RunChoice:
    """One point of the step-level plan space (see the module docstring)."""

    scope: str
    skip: str
    order: int
    threshold: float
    max_skip: int
    uncond_every: int
    warmup: int
    cooldown: int
    variable: str = "step"
    extrapolation: str = "taylor"

    @property
    def label(self) -> str:
        kind = "reuse" if self.skip == REUSE else f"forecast{self.order}"
        kind += "-sigma" if self.variable == "sigma" else ""
        kind += "-newton" if self.extrapolation == "newton" else ""
        cfg = f" uncond/{self.uncond_every}" if self.uncond_every > 1 else ""
        return (f"{self.scope} {kind} t={self.threshold:.3g} skip<={self.max_skip} "
                f"warmup={self.warmup} cooldown={self.cooldown}{cfg}")


def run_blocks(profile: Profile, scope: str) -> tuple[str, ...]:
    """The blocks of a ``scope`` run: all of them, or all but the first."""
    blocks = profile.blocks if scope in ("stack", "model") else profile.blocks[1:]
    if not blocks:
        raise ValueError(f"scope {scope!r} leaves no blocks in a {len(profile.blocks)}-block model")
    return blocks


def run_curve(profile: Profile, blocks: tuple[str, ...], context: int) -> np.ndarray:
    """Mean relative change [T] of the blocks' residuals vs the previous step (NaN at 0 -> 0)."""
    index = [profile.blocks.index(b) for b in blocks]
    return np.nan_to_num(profile.residual_change[context, index].mean(axis=0), nan=0.0)


def place_computes(curve: np.ndarray, warmup: int, threshold: float, max_skip: int,
                   cooldown: int) -> list[bool]:
    """Per step [T]: compute or not, accumulating ``curve`` [T] between computes."""
    steps = len(curve)
    mask, accumulated, skipped = [], 0.0, 0
    for step in range(steps):
        fixed = step < max(warmup, 1) or step >= steps - cooldown
        grown = accumulated + float(curve[step])
        if fixed or grown > threshold or skipped >= max_skip:
            mask.append(True)
            accumulated, skipped = 0.0, 0
        else:
            mask.append(False)
            accumulated, skipped = grown, skipped + 1
    return mask


def thin_uncond(cond_mask: list[bool], warmup: int, every: int) -> list[bool]:
    """The unconditional branch computes every ``every``-th of cond's post-warm-up computes."""
    out, seen = [], 0
    for step, computes in enumerate(cond_mask):
        if step < max(warmup, 1) or not computes:
            out.append(computes)
            continue
        out.append(seen % every == 0)
        seen += 1
    return out


def build_run(profile: Profile, choice: RunChoice) -> BlockRun:
    """The BlockRun of ``choice`` with a schedule per CFG context from that context's curve
    (a "model" run: one schedule for all contexts, from their mean curve)."""
    blocks = run_blocks(profile, choice.scope)
    masks = {}
    curves = [run_curve(profile, blocks, c) for c in range(len(profile.contexts))]
    if choice.scope == "model":
        curves = [np.mean(curves, axis=0)] * len(curves)
    for context, curve in zip(profile.contexts, curves, strict=True):
        masks[context] = place_computes(curve, choice.warmup, choice.threshold, choice.max_skip,
                                        choice.cooldown)
    if "uncond" in masks and choice.uncond_every > 1:
        masks["uncond"] = thin_uncond(masks["cond"], choice.warmup, choice.uncond_every)
    schedule = {c: "".join(COMPUTE if m else choice.skip for m in mask)
                for c, mask in masks.items()}
    return BlockRun(blocks=blocks, schedule=schedule, order=choice.order,
                    target="model" if choice.scope == "model" else "residual",
                    variable=choice.variable,
                    extrapolation=choice.extrapolation)


def plateau_of(profile: Profile, scope: str) -> float:
    """Median post-warm-up change per step of a scope's run, averaged over contexts."""
    blocks = run_blocks(profile, scope)
    curves = [run_curve(profile, blocks, c) for c in range(len(profile.contexts))]
    middle = np.concatenate([c[max(1, len(c) // 4):] for c in curves])
    return float(np.median(middle)) if len(middle) else 0.0


def run_choices(profile: Profile, warmup: int, sigma: bool = False,
                newton: bool = False, model: bool = True) -> list[RunChoice]:
    """Every step-level candidate for these traces (thresholds scaled to each scope's curve;
    warm-ups: ``warmup``, where the traces settle, and the shorter WARMUP_FRACTIONS; forecasts
    in sigma too with ``sigma`` when the traces record sigmas; Newton's order 2 too with
    ``newton``; whole-call "model" runs with ``model``, never thinning the unconditional
    branch)."""
    choices = []
    kinds = (*SKIP_KINDS, NEWTON_KIND) if newton else SKIP_KINDS
    uncond = UNCOND_EVERY if len(profile.contexts) > 1 else (1,)
    warmups = sorted({warmup, *(max(1, math.ceil(f * profile.steps)) for f in WARMUP_FRACTIONS)})
    variables = VARIABLES if sigma and profile.metadata.workload.sigmas else VARIABLES[:1]
    for scope in SCOPES:
        if (scope == "tail" and len(profile.blocks) < 2) or (scope == "model" and not model):
            continue
        level = max(plateau_of(profile, scope), 1e-6)
        for (skip, order, extrapolation), scale, max_skip, every, start, cooldown, variable in (
                itertools.product(kinds, THRESHOLD_SCALES, MAX_SKIPS, uncond, warmups,
                                  COOLDOWNS, variables)):
            if (variable == "sigma" and skip == REUSE) or (scope == "model" and every > 1):
                continue  # a reuse has no variable; a model run computes all branches together
            choices.append(RunChoice(scope, skip, order, level * scale, max_skip, every,
                                     start, cooldown, variable, extrapolation))
    return choices
