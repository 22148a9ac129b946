"""Calibration timing: warm-ups untimed, the median of the timed repeats, samples generated
--calibration-batch at a time, validated setup, resumable keys."""

from __future__ import annotations

import dataclasses
import types
from pathlib import Path

import pytest
import torch

from ditplan.runtime import calibrate
from ditplan.runtime.calibrate import CalibrationSetup, candidate_key, generate_batch, timed

CALIBRATED_PLAN = Path(__file__).parents[2] / "artifacts/plans/ditplan-ref-t2v-calibrated.json"


def _setup(**kw) -> CalibrationSetup:
    kw = {"record": Path("unused.jsonl"), "prompts": ("a red circle slowly moves right",), **kw}
    return CalibrationSetup(model="reference", device="cpu", **kw)


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
    with pytest.raises(ValueError, match="--calibration-batch must be at least 1, got 0"):
        _setup(batch=0)


def test_batch_generates_samples_in_order_in_chunks_and_sums_seconds(monkeypatch):
    samples = [(p, s) for p in ("a", "b") for s in (0, 1, 2)]
    calls = []

    def fake_generate_samples(pipe, prompts, seeds, work, device):
        calls.append(list(zip(prompts, seeds, strict=True)))
        frames = [torch.tensor([samples.index(sample)]) for sample in calls[-1]]
        return frames, 0.5 * len(calls)

    monkeypatch.setattr(calibrate, "generate_samples", fake_generate_samples)
    plan = types.SimpleNamespace(workload=None)
    frames, seconds = generate_batch(None, _setup(prompts=("a", "b"), seeds=(0, 1, 2), batch=4),
                                     plan)
    assert calls == [samples[:4], samples[4:]]
    assert [f.item() for f in frames] == list(range(len(samples)))
    assert seconds == 0.5 + 1.0
    calls.clear()
    generate_batch(None, _setup(prompts=("a", "b"), seeds=(0, 1, 2)), plan)
    assert calls == [samples]  # no batch: one call, as before


def test_a_batch_of_one_generates_what_one_batch_does():
    from ditplan.policy.plan import Workload
    from tests.factories import TINY_PROMPTS, tiny_reference_pipeline

    pipe = tiny_reference_pipeline()
    pipe.set_progress_bar_config(disable=True)
    plan = types.SimpleNamespace(workload=Workload(steps=3, height=16, width=16, frames=3,
                                                   guidance_scale=4.0, cfg=True))
    together, _ = generate_batch(pipe, _setup(prompts=TINY_PROMPTS, seeds=(0, 1)), plan)
    one_by_one, _ = generate_batch(pipe, _setup(prompts=TINY_PROMPTS, seeds=(0, 1), batch=1),
                                   plan)
    assert len(one_by_one) == len(together) == 4
    # each sample has its own generator, so only float32 rounding differs: CPU matmuls sum in
    # another order at another batch (~1e-6 here); different samples differ by >= 0.05
    for alone, batched in zip(one_by_one, together, strict=True):
        torch.testing.assert_close(alone, batched, rtol=0, atol=1e-5)


def test_candidate_key_names_the_batch_only_when_set():
    from ditplan.policy.plan_io import load_plan

    plan = load_plan(CALIBRATED_PLAN)
    # this plan's keys from candidate_key before --calibration-batch (aae3f6f): records
    # written then still resume (a recalibrated plan file needs them recomputed)
    assert candidate_key(plan, _setup()) == "54a92d643994d4b6"
    assert candidate_key(plan, _setup(repeats=3)) == "bfe18c4fb95ca869"
    batched = candidate_key(plan, _setup(batch=2))
    assert batched not in {candidate_key(plan, _setup()), candidate_key(plan, _setup(batch=1))}
    assert batched != candidate_key(plan, _setup(repeats=2))  # the batch is not read as repeats


class _Pipe:
    def set_progress_bar_config(self, **_):
        pass


def test_retiming_times_dense_and_the_plan_over_as_many_batches(monkeypatch, tmp_path):
    from ditplan.policy.plan_io import load_plan
    from ditplan.runtime.calibrate import Calibrator

    plan = load_plan(CALIBRATED_PLAN)
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


def test_a_measurement_records_its_batch_and_a_resumed_older_one_gets_the_setups(
        monkeypatch, tmp_path):
    import json

    from ditplan.policy.plan_io import load_plan, plan_to_json
    from ditplan.runtime.calibrate import Calibrator

    plan = load_plan(CALIBRATED_PLAN)
    assert plan.provenance.calibration.batch is None  # a schema 3.3 plan loads, batch unknown
    monkeypatch.setattr(calibrate, "generate_batch",
                        lambda pipe, setup, plan: ([torch.zeros(2, 2, 2, 3)], 1.0))
    monkeypatch.setattr(calibrate, "apply_any_plan",
                        lambda *a, **k: types.SimpleNamespace(remove=lambda: None))
    setup = _setup(record=tmp_path / "record.jsonl", prompts=("a", "b", "c"), seeds=(0, 1))
    assert Calibrator(setup, pipe=_Pipe())([plan])[0].batch == 6  # all 3 x 2 at once
    chunked = dataclasses.replace(setup, record=tmp_path / "chunked.jsonl", batch=4)
    assert Calibrator(chunked, pipe=_Pipe())([plan])[0].batch == 4

    row = json.loads((tmp_path / "record.jsonl").read_text())
    del row["calibration"]["batch"]  # a record written before the batch was recorded
    (tmp_path / "record.jsonl").write_text(json.dumps(row) + "\n")
    resumed = Calibrator(setup, pipe=_Pipe())([plan])[0]
    assert resumed.batch == 6
    recorded = dataclasses.replace(plan, provenance=dataclasses.replace(
        plan.provenance, calibration=resumed))
    assert '"batch": 6' in plan_to_json(recorded)
