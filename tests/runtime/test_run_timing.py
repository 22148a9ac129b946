"""`ditplan run --compare-dense` times both sides warm: an untimed generation before each."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest

from ditplan.runtime import run

WORKLOAD = dict(steps=4, height=16, width=16, frames=2, guidance_scale=4.0)


class FakeGenerations:
    """Stands in for ``run.generate``: the first generation of a process (10 s) and the first
    after a plan is applied or removed (3 s) are cold; later ones take 1 s on either side: true
    speedup 1."""

    def __init__(self):
        self.events: list[str] = []

    def generate(self, pipe, config, workload):
        wall = (10.0 if "generate" not in self.events
                else 3.0 if self.events[-1] in ("apply", "remove") else 1.0)
        self.events.append("generate")
        frames = np.zeros((workload["frames"], workload["height"], workload["width"], 3), np.uint8)
        return frames, {"wall_s": wall, "step_s_median": wall / workload["steps"]}

    def apply_any_plan(self, pipe, plan, backend, parallel, compile):
        self.events.append("apply compiled" if compile else "apply")
        return SimpleNamespace(stats=dict, remove=lambda: self.events.append("remove"))

    def compile_blocks(self, pipe, compile):
        self.events.append("compile dense")
        return SimpleNamespace(remove=lambda: self.events.append("uncompile dense"))


class FakeVideoPipeline:
    """What ``run`` reads of a video pipeline: its call's parameters."""

    def __call__(self, prompt, num_inference_steps, num_frames, height, width, guidance_scale):
        raise AssertionError("generate is faked")


@pytest.fixture
def fake(monkeypatch):
    fake = FakeGenerations()
    monkeypatch.setattr(run, "generate", fake.generate)
    monkeypatch.setattr(run, "apply_any_plan", fake.apply_any_plan)
    monkeypatch.setattr(run, "compile_blocks", fake.compile_blocks)
    monkeypatch.setattr(run, "load_any_plan", lambda path: SimpleNamespace(
        workload=SimpleNamespace(**WORKLOAD)))
    monkeypatch.setattr(run, "load_pipeline", lambda model, device: FakeVideoPipeline())
    monkeypatch.setattr(run, "compare_videos", lambda a, b: {"psnr_db": 99.0, "ssim": 1.0})
    monkeypatch.setattr(run, "write_video", lambda path, frames: path)
    return fake


@pytest.mark.parametrize("repeats", [1, 3])
def test_compare_dense_warms_each_side_before_timing(fake, tmp_path, repeats):
    config = run.RunConfig(out=tmp_path, plan=tmp_path / "plan.json", compare_dense=True,
                           repeats=repeats)
    metrics = run.run_generation(config)
    side = ["generate"] * (run.COMPARE_WARMUP_RUNS + repeats)
    assert fake.events == ["apply", *side, "remove", *side]  # the plan first: see run_generation
    assert metrics["speedup_vs_dense"] == pytest.approx(1.0)  # timed cold: 3.3x
    assert metrics["step_speedup_vs_dense"] == pytest.approx(1.0)
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["dense"]["warmup_runs"] == saved["run"]["warmup_runs"] == 1
    assert saved["dense"]["wall_s_runs"] == saved["run"]["wall_s_runs"] == [1.0] * repeats


def test_a_plain_run_does_not_warm_up(fake, tmp_path):
    metrics = run.run_generation(run.RunConfig(out=tmp_path, plan=tmp_path / "plan.json"))
    assert fake.events == ["apply", "generate", "remove"]
    assert metrics["run"]["warmup_runs"] == 0 and "dense" not in metrics


def test_compiled_comparison_compiles_both_sides_and_warms_each_until_settled(fake, tmp_path):
    config = run.RunConfig(out=tmp_path, plan=tmp_path / "plan.json", compare_dense=True,
                           repeats=2, compile=True)
    metrics = run.run_generation(config)
    side = ["generate"] * (run.COMPILE_WARMUP_RUNS + 2)
    assert fake.events == ["apply compiled", *side, "remove", "compile dense", *side,
                           "uncompile dense"]
    assert metrics["run"]["warmup_runs"] == metrics["dense"]["warmup_runs"] == (
        run.COMPILE_WARMUP_RUNS)


def test_a_compiled_run_without_a_plan_compiles_the_blocks(fake, tmp_path):
    run.run_generation(run.RunConfig(out=tmp_path, compile=True, **WORKLOAD))
    assert fake.events == ["compile dense", *["generate"] * (run.COMPILE_WARMUP_RUNS + 1),
                           "uncompile dense"]
