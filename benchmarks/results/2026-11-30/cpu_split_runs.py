"""Two-run split schedules vs the shipped single run at the same compute budget (CPU)."""
import dataclasses
from pathlib import Path

from ditplan.policy.load_profile import load_profile
from ditplan.policy.plan import BlockRun
from ditplan.policy.plan_io import load_plan
from ditplan.policy.search import place_computes, run_curve
from ditplan.runtime.calibrate import CalibrationSetup, Calibrator

base = load_plan("artifacts/plans/ditplan-ref-t2v-calibrated.json")
profile = load_profile("artifacts/traces/ditplan-ref-t2v")
blocks = profile.blocks


def schedule(group, computes, ctx):
    curve = run_curve(profile, group, ctx)
    lo, hi = 0.0, float(curve.sum()) + 1
    for _ in range(60):
        mid = (lo + hi) / 2
        n = sum(place_computes(curve, 1, mid, 3, 0))
        lo, hi = (mid, hi) if n > computes else (lo, mid)
    return "".join("C" if m else "F" for m in place_computes(curve, 1, hi, 3, 0))


def split_plan(k, first, second):
    runs = []
    for group, n in ((blocks[:k], first), (blocks[k:], second)):
        sched = {c: schedule(group, n, i) for i, c in enumerate(profile.contexts)}
        runs.append(BlockRun(group, sched, order=2))
    return dataclasses.replace(base, runs=tuple(runs))


variants = {"shipped (10 C all)": base,
            "first4 12C / last4 8C": split_plan(4, 12, 8),
            "first4 8C / last4 12C": split_plan(4, 8, 12),
            "first2 14C / last6 9C": split_plan(2, 14, 9)}
for name, p in variants.items():
    print(name, [(r.blocks[0], r.schedule["cond"]) for r in p.runs], flush=True)
setup = CalibrationSetup(model="reference", prompts=("a blue square slowly moves up",
                         "a green triangle slowly moves left"), device="cpu",
                         record=Path("/tmp/x/split.jsonl"), repeats=1)
cal = Calibrator(setup)
for name, p in variants.items():
    (m,) = cal([p])
    print(f"{name:24s} {m.speedup:.2f}x {m.psnr_db:.2f} dB", flush=True)
