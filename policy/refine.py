"""Local search after calibration: move single compute steps of the chosen plan, keep what
measures better (same compute budget, so the same speed)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from ditplan.policy.load_profile import Profile
from ditplan.policy.plan import COMPUTE, BlockRun, Plan
from ditplan.policy.quality import attention_error, attention_losses, runs_error


def moved(actions: str, step: int, to: int) -> str:
    """``actions`` with the compute at ``step`` and the skip at ``to`` swapped."""
    letters = list(actions)
    letters[step], letters[to] = letters[to], letters[step]
    return "".join(letters)


def run_moves(run: BlockRun) -> list[BlockRun]:
    """Every run that moves one computed step to a skipped neighbour step (step 0 keeps
    computing: nothing is cached before it): in all contexts at once where they share that
    compute and skip (batched CFG then keeps whole-batch computes), and in each context alone
    (never for a whole-call "model" run, which keeps one schedule)."""
    out = []
    contexts = tuple(run.schedule)
    together = len(contexts) > 1 or run.whole_call
    for step, to in _shifts(len(next(iter(run.schedule.values())))):
        if together and all(_movable(a, step, to) for a in run.schedule.values()):
            out.append(dataclasses.replace(run, schedule={
                c: moved(a, step, to) for c, a in run.schedule.items()}))
    if run.whole_call:
        return out
    for context, actions in run.schedule.items():
        for step, to in _shifts(len(actions)):
            if _movable(actions, step, to):
                schedule = {**run.schedule, context: moved(actions, step, to)}
                out.append(dataclasses.replace(run, schedule=schedule))
    return out


def _shifts(steps: int) -> list[tuple[int, int]]:
    """(step, neighbour) pairs a compute may move between, step 0 excluded."""
    return [(s, t) for s in range(1, steps) for t in (s - 1, s + 1) if 0 < t < steps]


def _movable(actions: str, step: int, to: int) -> bool:
    return actions[step] == COMPUTE and actions[to] != COMPUTE


def neighbours(plan: Plan, profile: Profile, limit: int) -> list[Plan]:
    """At most ``limit`` plans one move away from ``plan``: least predicted error first, but
    the best move of each source step before a second move of any step (the error model ranks
    moves weakly, so the measured ones are spread along the schedule)."""
    specs = {b: lp.attention for b, lp in plan.layers.items()}
    losses = attention_losses(profile, specs)  # moves change the runs only
    candidates = []
    for i, run in enumerate(plan.runs):
        for new in run_moves(run):
            runs = (*plan.runs[:i], new, *plan.runs[i + 1:])
            error = attention_error(profile, specs, losses, runs) + runs_error(profile, runs)
            candidates.append((error, _source(run, new), runs))
    candidates.sort(key=lambda c: c[0])
    firsts, seconds, seen = [], [], set()
    for c in candidates:
        (seconds if c[1] in seen else firsts).append(c)
        seen.add(c[1])
    out = []
    for error, _, runs in (firsts + seconds)[:limit]:
        provenance = dataclasses.replace(plan.provenance, predicted_error=error)
        out.append(dataclasses.replace(plan, runs=runs, provenance=provenance))
    return out


def _source(run: BlockRun, new: BlockRun) -> int:
    """The step whose compute ``new`` moved away (the first changed position)."""
    for old, now in zip(run.schedule.values(), new.schedule.values(), strict=True):
        for step, (a, b) in enumerate(zip(old, now, strict=True)):
            if a != b:
                return step if a == COMPUTE else step + 1
    raise ValueError("the run did not move")


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
