"""Calibration timing: warm-ups untimed, the median of the timed repeats, validated setup."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ditplan.runtime import calibrate
from ditplan.runtime.calibrate import CalibrationSetup, timed


def _setup(**kw) -> CalibrationSetup:
    return CalibrationSetup(model="reference", prompts=("a red circle slowly moves right",),
                            device="cpu", record=Path("unused.jsonl"), **kw)


def test_timed_skips_warmups_and_keeps_the_median_of_repeats(monkeypatch):
    seconds = iter([50.0, 3.0, 9.0, 4.0])  # a slow warm-up, then a noisy outlier
    calls = []

    def fake_generate(pipe, setup, plan):
        calls.append(1)
        return [torch.full((1,), float(len(calls)))], next(seconds)

    monkeypatch.setattr(calibrate, "generate_batch", fake_generate)
    frames, median = timed(None, _setup(warmup=1, repeats=3), None)
    assert len(calls) == 4 and median == 4.0 and frames[0].item() == 4.0


def test_setup_refuses_bad_counts():
    with pytest.raises(ValueError, match="repeats >= 1"):
        _setup(repeats=0)
    with pytest.raises(ValueError, match="--calibration-prompts"):
        CalibrationSetup(model="reference", prompts=(), device="cpu", record=Path("x"))
