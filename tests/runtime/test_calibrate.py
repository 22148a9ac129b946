"""Calibration timing: warm-ups untimed, the median of the timed repeats, validated setup."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ditplan.runtime import calibrate
from ditplan.runtime.calibrate import CalibrationSetup, timed


def _setup(**kw) -> CalibrationSetup:
    kw = {"record": Path("unused.jsonl"), **kw}
    return CalibrationSetup(model="reference", prompts=("a red circle slowly moves right",),
                            device="cpu", **kw)


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


class _Pipe:
    def set_progress_bar_config(self, **_):
        pass


def test_retiming_times_dense_and_the_plan_over_as_many_batches(monkeypatch, tmp_path):
    from ditplan.policy.plan_io import load_plan
    from ditplan.runtime.calibrate import Calibrator

    plan = load_plan(Path(__file__).parents[2] / "artifacts/plans/ditplan-ref-t2v-calibrated.json")
    applied = []
    seconds = {False: iter([9.0, 8.0, 8.2, 7.8, 8.0]), True: iter([4.0, 4.2, 3.8, 4.0])}

    def fake_generate(pipe, setup, plan):
        return [torch.zeros(2, 2, 2, 3)], next(seconds[bool(applied)])

    class Handle:
        def remove(self):
            applied.clear()

    monkeypatch.setattr(calibrate, "generate_batch", fake_generate)
    checked = []

    def fake_apply(pipe, plan, backend, check_weights):
        checked.append(check_weights)
        applied.append(1)
        return Handle()

    monkeypatch.setattr(calibrate, "apply_any_plan", fake_apply)
    calibrator = Calibrator(_setup(record=tmp_path / "record.jsonl"), pipe=_Pipe())
    once = calibrator([plan])[0]
    assert once.dense_s == 8.0 and once.plan_s == 4.0  # after dense's cold call
    again = calibrator([plan], repeats=3)[0]
    assert again.dense_s == 8.0 and again.plan_s == 4.0  # medians of 8.2/7.8/8.0, 4.2/3.8/4.0
    rows = (tmp_path / "record.jsonl").read_text().splitlines()
    assert len(rows) == 2  # a re-timing is its own record entry, resumable like the first
    assert calibrator([plan], repeats=3)[0] == again  # resumed, nothing generated
    assert checked == [True, False]  # the weights are hashed once per identity
