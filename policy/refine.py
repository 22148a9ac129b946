"""Local search after calibration: move single compute steps of the chosen plan, keep what
measures better (same compute budget, so the same speed)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from ditplan.policy.load_profile import Profile
from ditplan.policy.plan import COMPUTE, BlockRun, Plan
from ditplan.policy.quality import predicted_error


def moved(actions: str, step: int, to: int) -> str:
    """``actions`` with the compute at ``step`` and the skip at ``to`` swapped."""
    letters = list(actions)
    letters[step], letters[to] = letters[to], letters[step]
    return "".join(letters)


def run_moves(run: BlockRun) -> list[BlockRun]:
    """Every run that moves one computed step of one context to a skipped neighbour step
    (step 0 keeps computing: nothing is cached before it)."""
    out = []
    for context, actions in run.schedule.items():
        for step, action in enumerate(actions):
            if action != COMPUTE or step == 0:
                continue
            for to in (step - 1, step + 1):
                if 0 < to < len(actions) and actions[to] != COMPUTE:
                    schedule = {**run.schedule, context: moved(actions, step, to)}
                    out.append(dataclasses.replace(run, schedule=schedule))
    return out


def neighbours(plan: Plan, profile: Profile, limit: int) -> list[Plan]:
    """At most ``limit`` plans one move away from ``plan``, least predicted error first."""
    specs = {b: lp.attention for b, lp in plan.layers.items()}
    candidates = []
    for i, run in enumerate(plan.runs):
        for new in run_moves(run):
            runs = (*plan.runs[:i], new, *plan.runs[i + 1:])
            candidates.append((predicted_error(profile, specs, runs), runs))
    candidates.sort(key=lambda c: c[0])
    out = []
    for error, runs in candidates[:limit]:
        provenance = dataclasses.replace(plan.provenance, predicted_error=error)
        out.append(dataclasses.replace(plan, runs=runs, provenance=provenance))
    return out


def refine(plan: Plan, profile: Profile, measure: Callable, accept: Callable, rounds: int,
           per_round: int) -> tuple[Plan, object, int]:
    """Up to ``rounds`` rounds: measure ``per_round`` neighbours of the best plan so far and
    move to the best one ``accept(new, old)`` takes (higher PSNR within the constraints).

    Args:
        plan: the calibrated choice; its provenance holds its measurement.
        measure: plans -> one Calibration each (the compiler's calibrator).
        accept: (new Calibration, current Calibration) -> bool.
    Returns:
        (the best plan, its Calibration, how many neighbours were measured).
    """
    best, best_measured, count = plan, plan.provenance.calibration, 0
    for _ in range(rounds):
        options = neighbours(best, profile, per_round)
        if not options:
            break
        results = measure(options)
        count += len(options)
        winners = [(m, p) for m, p in zip(results, options, strict=True)
                   if accept(m, best_measured)]
        if not winners:
            break
        best_measured, best = max(winners, key=lambda w: w[0].psnr_db)
    return best, best_measured, count
