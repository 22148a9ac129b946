"""Probe: the chosen plans measured on the benchmark's new (speed-matched) calibration captions.

Run from the repository root: python callD/cal_new.py OUT PLAN.json... (as run in call D,
reformatted since).
"""

import json
import sys
from pathlib import Path

from benchmarks.quality.harness import (
    CALIBRATION_CAPTIONS,
    calibration_captions,
    held_out_samples,
)
from ditplan.policy.plan_io import load_plan
from ditplan.reference.attributes import captions_for, heldout_attributes
from ditplan.runtime.calibrate import CalibrationSetup, Calibrator
from ditplan.runtime.loading import load_pipeline

out = Path(sys.argv[1])
paths = sys.argv[2:]
pipe = load_pipeline("reference", device="cuda")
like = held_out_samples(32, (0,))[1]
sets = {"new-calibration16": calibration_captions(CALIBRATION_CAPTIONS, like=like),
        "eval32": tuple(captions_for(heldout_attributes())[:32])}
rows = []
for name, prompts in sets.items():
    setup = CalibrationSetup(model="reference", prompts=prompts, device="cuda",
                             record=out / f"rec_{name}.jsonl", warmup=1)
    cal = Calibrator(setup, pipe=pipe)
    for path in (paths if name != "eval32" else paths[:1]):
        m = cal([load_plan(path)])[0]
        rows.append((name, Path(path).name, len(prompts), m.speedup, m.psnr_db, m.dense_s,
                     m.plan_s))
        print(f"{name:18s} {Path(path).name:22s} n={len(prompts)} {m.speedup:.3f}x "
              f"{m.psnr_db:.2f} dB (dense {m.dense_s:.3f} s)", flush=True)
json.dump(rows, open(out / "cal_new.json", "w"))
