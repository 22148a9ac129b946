"""Compute steps chosen by replaying the traces: a greedy ladder of block-run schedules.

From a run that computes every step, the (CFG branch, step) whose skip adds the least replayed
error (policy/quality.py, the branch weighted by its share of the guided output) is skipped,
one at a time; each schedule along the way is a candidate, down to MIN_COMPUTE_SHARE of the
branch evaluations. Skips are all reuses or all forecasts of one order, so the ladder also
decides the warm-up, where the unconditional branch computes less (CFG reuse), and which
forecasts are too far from their last compute.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from ditplan.policy.load_profile import Profile
from ditplan.policy.plan import COMPUTE, REUSE, BlockRun
from ditplan.policy.quality import cfg_weights, replay_inputs, schedule_error, step_weights
from ditplan.policy.search import SCOPES, SKIP_KINDS, run_blocks

MIN_COMPUTE_SHARE = 0.2  # the ladder stops at this share of branch evaluations computed


def greedy_ladder(profile: Profile, run: BlockRun, skip: str) -> list[BlockRun]:
    """Schedules of ``run`` (its blocks, order, target and variable) with one more skipped
    (branch, step) each, starting from one skip; ``skip`` is "R" or "F"."""
    contexts = profile.contexts
    weights, steps = cfg_weights(profile), step_weights(profile)
    inputs = {c: replay_inputs(profile, run, c) for c in contexts}
    schedule = {c: [COMPUTE] * profile.steps for c in contexts}

    def error(context: str, actions: list[str]) -> float:
        value, scale = inputs[context]
        return weights[context] * schedule_error(profile, run, "".join(actions), value, scale,
                                                 steps)

    current = {c: error(c, schedule[c]) for c in contexts}
    ladder = []
    floor = int(np.ceil(MIN_COMPUTE_SHARE * profile.steps * len(contexts)))
    computes = profile.steps * len(contexts)
    while computes > floor:
        best = None
        for context in contexts:
            actions = schedule[context]
            for step in range(1, profile.steps):
                if actions[step] != COMPUTE:
                    continue
                actions[step] = skip
                added = error(context, actions) - current[context]
                actions[step] = COMPUTE
                if best is None or added < best[0]:
                    best = (added, context, step)
        _, context, step = best
        schedule[context][step] = skip
        current[context] = error(context, schedule[context])
        computes -= 1
        ladder.append(dataclasses.replace(
            run, schedule={c: "".join(a) for c, a in schedule.items()}))
    return ladder


def greedy_runs(profile: Profile) -> list[tuple[str, BlockRun]]:
    """(label, run) for every rung of every scope's and skip kind's ladder (needs sketches)."""
    out = []
    for scope in SCOPES:
        if scope == "tail" and len(profile.blocks) < 2:
            continue
        blocks = run_blocks(profile, scope)
        for skip, order in SKIP_KINDS:
            start = BlockRun(blocks=blocks, schedule=dict.fromkeys(profile.contexts, COMPUTE),
                             order=order)
            kind = "reuse" if skip == REUSE else f"forecast{order}"
            for run in greedy_ladder(profile, start, skip):
                computed = "/".join(str(run.actions(c).count(COMPUTE)) for c in profile.contexts)
                out.append((f"{scope} {kind} greedy computes={computed}", run))
    return out
