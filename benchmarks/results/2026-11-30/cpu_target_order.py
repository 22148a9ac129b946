"""The shipped calibrated plan's schedule with residual vs output forecasts, order 1 vs 2, and
diffusers' TaylorSeer interval-2 schedule, measured by the calibrator on two training captions
(run from the repository root: ``python benchmarks/results/2026-11-30/cpu_target_order.py``)."""

import dataclasses
from pathlib import Path

from ditplan.policy.plan_io import load_plan
from ditplan.runtime.calibrate import CalibrationSetup, Calibrator

PROMPTS = ("a purple diamond slowly moves toward the lower left",
           "an orange circle quickly moves down")

base = load_plan("artifacts/plans/ditplan-ref-t2v-calibrated.json")
(run,) = base.runs
taylorseer = dict.fromkeys(run.schedule,
                           "".join("C" if s < 2 or (s - 3) % 2 == 0 else "F" for s in range(16)))
variants = {
    "shipped residual o2": run,
    "shipped output o2": dataclasses.replace(run, target="output"),
    "shipped residual o1": dataclasses.replace(run, order=1),
    "shipped output o1": dataclasses.replace(run, target="output", order=1),
    "taylorseer-i2 output o1": dataclasses.replace(run, schedule=taylorseer, target="output",
                                                   order=1),
    "taylorseer-i2 residual o1": dataclasses.replace(run, schedule=taylorseer, order=1),
}
setup = CalibrationSetup(model="reference", prompts=PROMPTS, device="cpu",
                         record=Path("cpu_target_order.jsonl"))
calibrator = Calibrator(setup)
for name, variant in variants.items():
    (measured,) = calibrator([dataclasses.replace(base, runs=(variant,))])
    print(f"{name:28s} {measured.speedup:.2f}x {measured.psnr_db:.2f} dB", flush=True)
