"""Probe: PSNR of the calibrated plans on calibration caption sets vs the evaluation captions.

Run from the repository root: python callC/cal_sets.py OUT PLAN.json... (as run in call C,
reformatted since).
"""

import json
import sys
from pathlib import Path

import torch

from ditplan.policy.plan_io import load_plan
from ditplan.reference.attributes import captions_for, heldout_attributes, sample_attributes
from ditplan.runtime.calibrate import CalibrationSetup, Calibrator
from ditplan.runtime.loading import load_pipeline


def train_by_speed(speed, n):
    a = sample_attributes(256, torch.Generator().manual_seed(7), max_sprites=1)
    caps = captions_for(a)
    return tuple(c for c, s in zip(caps, a.speed[:, 0].tolist(), strict=True) if s == speed)[:n]


ev = captions_for(heldout_attributes())
old = sample_attributes(16, torch.Generator().manual_seed(2026), max_sprites=1)  # the set used
sets = {"train-mixed16 (current)": tuple(captions_for(old)),  # until commit 027edc7
        "train-slow16": train_by_speed(0, 16), "train-fast16": train_by_speed(1, 16),
        "eval32": tuple(ev[:32]), "heldout-fast32": tuple(ev[32:64])}
out = Path(sys.argv[1])
plans = [load_plan(p) for p in sys.argv[2:]]
pipe = load_pipeline("reference", device="cuda")
rows = []
for name, prompts in sets.items():
    setup = CalibrationSetup(model="reference", prompts=prompts, device="cuda",
                             record=out / f"rec_{name.split()[0]}.jsonl", warmup=1)
    cal = Calibrator(setup, pipe=pipe)
    for path, plan in zip(sys.argv[2:], plans, strict=True):
        m = cal(plans=[plan])[0]
        rows.append((name, Path(path).name, len(prompts), m.speedup, m.psnr_db))
        print(f"{name:24s} {Path(path).name:22s} n={len(prompts)} {m.speedup:.3f}x "
              f"{m.psnr_db:.2f} dB", flush=True)
json.dump(rows, open(out / "cal_sets.json", "w"))
