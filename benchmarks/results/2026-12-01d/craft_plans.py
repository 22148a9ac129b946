"""Session 22's hand-made long-model plans: whole-call reuse schedules x sparse attention settings.

Usage: python craft_plans.py TRACES SPECS OUT. Each SPECS line: name, warm-up W, max skip K (the
run computes steps 0..W-1, then every (K + 1)-th), recall R ("-": dense attention; below 0.5: a
fixed density), attention warm-up A (sparse from step A), estimate ("-", "measured", "all").
Plans come from the compiler's own pieces (layer_plans, build_run, assembly), so they validate
and run like compiled ones; their predicted errors follow the compiler of the commit they run on.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from pathlib import Path

from ditplan.policy import compiler as C
from ditplan.policy.config import CompilerConfig
from ditplan.policy.plan import REUSE
from ditplan.policy.plan_io import save_plan
from ditplan.policy.quality import predicted_error
from ditplan.policy.search import RunChoice, build_run


def main(traces: str, specs: str, out: str) -> None:
    config = CompilerConfig.from_name("balanced", target_speedup=2.5)
    profile, decision, cost = C._searchable(traces, config)
    Path(out).mkdir(parents=True, exist_ok=True)
    for line in Path(specs).read_text().splitlines():
        if not line.strip():
            continue
        name, warmup, skip, recall, start, estimate = line.split()
        choice = RunChoice("model", REUSE, 1, math.inf, int(skip), 1, int(warmup), 0)
        runs = (build_run(profile, choice),)
        if recall == "-":
            attention, tag = dataclasses.replace(config, fixed_density=1.0), ""
        else:
            value = float(recall)
            field = {"fixed_density": value} if value < 0.5 else {"recall_target": value}
            attention = dataclasses.replace(
                config, estimate_dropped=None if estimate == "-" else estimate, **field)
            named = "" if estimate == "-" else f" estimate={estimate}"
            kind = "density" if value < 0.5 else "recall"
            tag = f" {kind}={value} attention-warmup={start}{named}"
        layers = C.layer_plans(profile, decision.roles, attention, int(start), cost)
        specs_ = {b: lp.attention for b, lp in layers.items()}
        speedup = cost.predict_speedup(specs_, runs, profile.steps, profile.contexts)
        design = C.Design(attention, layers, runs, speedup,
                          predicted_error(profile, specs_, runs), choice.label + tag)
        (plan,) = C._assembled(profile, decision, [design])
        save_plan(plan, Path(out) / f"{name}.json")
        print(f"{name}: predicted {speedup:.2f}x, {design.label}")


if __name__ == "__main__":
    main(*sys.argv[1:])
