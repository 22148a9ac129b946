"""Wan2.2 two-expert plans end to end on a tiny saved pipeline: profile, compile, show, run."""

from __future__ import annotations

import json

import pytest
import torch

from ditplan.policy.experts import ExpertPlans, load_any_plan
from ditplan.profiler.schema import read_traces
from ditplan.runtime.apply import compile_blocks
from ditplan.runtime.cli import main
from ditplan.runtime.compiled_blocks import has_compile_hook
from ditplan.runtime.experts import apply_any_plan
from ditplan.runtime.loading import load_pipeline
from tests.experts_factories import BOUNDARY, saved_tiny_experts_pipeline

PROMPT = "a red circle slowly moves right"
# 4 frames x 16 x 16 px -> 4 x 8 x 8 tokens; 4 steps with CFG: steps 0-1 run transformer,
# 2-3 transformer_2. Attention statistics at steps 0 and 2 only (one per expert; faster).
WORKLOAD = ["--steps", "4", "--frames", "4", "--height", "16", "--width", "16"]
RANGES = {"transformer": (0, 2), "transformer_2": (2, 4)}


@pytest.fixture(scope="module")
def experts_dir(tmp_path_factory):
    return saved_tiny_experts_pipeline(tmp_path_factory.mktemp("experts-model"))


@pytest.fixture(scope="module")
def traces_dir(experts_dir, tmp_path_factory):
    traces = tmp_path_factory.mktemp("experts-flow") / "traces"
    assert main(["profile", "--model", str(experts_dir), "--out", str(traces), "--prompts",
                 PROMPT, "--block-size", "64", "--tile", "1x4x4", "--attention-steps", "0",
                 "2", "--device", "cpu", "--no-progress", *WORKLOAD]) == 0
    return traces


@pytest.fixture(scope="module")
def plan_path(traces_dir):
    plan = traces_dir.parent / "wan22.json"
    assert main(["compile-policy", str(traces_dir), "--out", str(plan), "--quality", "fast",
                 "--density", "0.5", "--all-roles", "background"]) == 0
    return plan


def test_profile_records_each_experts_steps(traces_dir):
    index = json.loads((traces_dir / "experts.json").read_text())
    assert index["step_ranges"] == {n: list(r) for n, r in RANGES.items()}
    assert index["boundary_ratio"] == BOUNDARY and index["steps"] == 4
    hashes = set()
    for name, (start, stop) in RANGES.items():
        traces = read_traces(traces_dir / name)  # an ordinary one-transformer trace folder
        meta = traces.metadata
        assert meta.workload.steps == stop - start
        assert meta.profiler_settings["step_range"] == [start, stop]
        assert meta.profiler_settings["attention_steps"] == [0]  # global 0 and 2, local 0
        assert sorted(set(traces.tables["attention_stats"]["step"].to_pylist())) == [0]
        assert sorted(set(traces.tables["step_change"]["step"].to_pylist())) == [1]
        hashes.add(meta.fingerprint.weights_hash)
    assert len(hashes) == 2


def test_compile_show_and_run(plan_path, experts_dir, tmp_path, capsys):
    plans = load_any_plan(plan_path)
    assert isinstance(plans, ExpertPlans) and plans.boundary_ratio == BOUNDARY
    for name, plan in plans.experts.items():
        assert plan.workload.step_range == RANGES[name] and plan.workload.steps == 4
        start = RANGES[name][0]
        assert all(lp.attention.dense_steps == (start,) for lp in plan.layers.values())
    assert main(["plan", "show", str(plan_path)]) == 0
    shown = capsys.readouterr().out
    assert "[transformer]" in shown and "[transformer_2]" in shown
    assert "this expert: steps 2-3" in shown
    out = tmp_path / "run"
    assert main(["run", "--model", str(experts_dir), "--plan", str(plan_path), "--prompt",
                 PROMPT, "--device", "cpu", "--backend", "torch", "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["run"]["experts"]) == set(RANGES)
    assert 0 < metrics["run"]["attention_density"] < 1


def test_compiled_run_compiles_both_experts(plan_path, experts_dir, tmp_path):
    """`--compile` with a plan file per expert: each expert's plan compiled beneath its hooks,
    then dense with both experts compiled; frames equal the eager plan's (dynamo's eager
    backend runs the same ops)."""
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    run = ["run", "--model", str(experts_dir), "--plan", str(plan_path), "--prompt", PROMPT,
           "--device", "cpu", "--backend", "torch"]
    assert main([*run, "--out", str(tmp_path / "eager")]) == 0
    assert counters["stats"]["unique_graphs"] == 0
    assert main([*run, "--compile", "eager", "--compare-dense",
                 "--out", str(tmp_path / "compiled")]) == 0
    assert counters["stats"]["unique_graphs"] >= 2
    frames = [(tmp_path / name / "frames.png").read_bytes() for name in ("eager", "compiled")]
    assert frames[0] == frames[1]
    pipe = load_pipeline(str(experts_dir))  # dense's compilation covers both experts
    compiled = compile_blocks(pipe, {"backend": "eager"})
    hooked = [has_compile_hook(block) for name in RANGES for block in getattr(pipe, name).blocks]
    compiled.remove()
    assert hooked == [True] * 2 * len(pipe.transformer.blocks)


def test_each_expert_computes_only_its_steps(plan_path, experts_dir):
    pipe = load_pipeline(str(experts_dir))
    pipe.set_progress_bar_config(disable=True)
    handle = apply_any_plan(pipe, load_any_plan(plan_path), backend="torch")
    pipe(PROMPT, num_inference_steps=4, num_frames=4, height=16, width=16,
         generator=torch.Generator().manual_seed(0), output_type="latent")
    for name, (start, stop) in RANGES.items():
        (run,) = handle.handles[name].runs
        steps = {step for _, step in run.computed_steps}
        assert steps == set(range(start, stop)), name
        assert handle.handles[name].tracker.calls_seen == 2 * (stop - start)  # CFG
    handle.remove()


def test_plans_and_pipelines_must_match(plan_path, traces_dir, experts_dir, model_dir,
                                        tmp_path, capsys):
    run = ["--prompt", PROMPT, "--device", "cpu", "--backend", "torch"]
    out = tmp_path / "one"
    assert main(["run", "--model", str(model_dir), "--plan", str(plan_path), *run,
                 "--out", str(out)]) == 2
    assert "section per expert" in capsys.readouterr().err and not out.exists()
    single = tmp_path / "single.json"  # one expert's folder compiles as a one-transformer plan
    assert main(["compile-policy", str(traces_dir / "transformer"), "--out", str(single),
                 "--quality", "fast"]) == 0
    capsys.readouterr()
    assert main(["run", "--model", str(experts_dir), "--plan", str(single), *run,
                 "--out", str(out)]) == 2
    assert "this pipeline has 2 experts" in capsys.readouterr().err and not out.exists()
    swapped = saved_tiny_experts_pipeline(tmp_path, swapped=True)
    assert main(["run", "--model", str(swapped), "--plan", str(plan_path), *run,
                 "--out", str(out)]) == 2
    assert "sections are swapped" in capsys.readouterr().err and not out.exists()


@pytest.mark.parametrize("edit, message", [
    (lambda d: d.update(schema_version="4.0"), "newer ditplan"),
    (lambda d: d["experts"]["transformer_2"]["workload"].update(steps=0),
     "experts.transformer_2.workload.steps"),
    (lambda d: d.pop("boundary_ratio"), "'boundary_ratio' is a required property"),
    (lambda d: d["experts"].pop("transformer_2"), "'transformer_2' is a required property"),
])
def test_bad_expert_files_refused_before_any_output(plan_path, experts_dir, tmp_path, capsys,
                                                    edit, message):
    data = json.loads(plan_path.read_text())
    edit(data)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(data))
    out = tmp_path / "run"
    assert main(["run", "--model", str(experts_dir), "--plan", str(bad), "--device", "cpu",
                 "--out", str(out)]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()
    assert main(["plan", "show", str(bad)]) == 1


def test_calibrated_compile_measures_pairs_and_resumes(traces_dir, experts_dir, tmp_path,
                                                       capsys, monkeypatch):
    plan = tmp_path / "calibrated.json"
    # the pipeline and its default: the profiled one; any pair reaches 0.1x on a busy CPU
    argv = ["compile-policy", str(traces_dir), "--out", str(plan), "--target-speedup", "0.1",
            "--calibrate", "--device", "cpu", "--candidates", "3",
            "--calibration-prompts", "a blue square quickly moves up"]
    assert main(argv) == 0
    said = capsys.readouterr().out
    assert "the pair measured" in said and "best of 3 candidates" in said
    sections = json.loads(plan.read_text())["experts"]
    calibration = sections["transformer"]["provenance"]["calibration"]
    assert sections["transformer_2"]["provenance"]["calibration"] == calibration
    assert calibration["prompts"] == 1 and calibration["candidates"] == 3
    record = tmp_path / "calibrated.calibration.jsonl"
    rows = [json.loads(line) for line in record.read_text().splitlines()]
    assert len(rows) == 3 and all(" | " in row["design"] for row in rows)  # one row per pair
    assert calibration["psnr_db"] == pytest.approx(max(r["calibration"]["psnr_db"]
                                                       for r in rows))  # the best measured
    from ditplan.runtime import calibrate

    def refuse(*args, **kwargs):
        raise AssertionError("a finished pair was measured again")

    with monkeypatch.context() as patched:  # resumed: every pair read back, none generated
        patched.setattr(calibrate.Calibrator, "measure", refuse)
        again = tmp_path / "again.json"
        assert main([*argv[:3], str(again), *argv[4:], "--calibration-record", str(record)]) == 0
    assert json.loads(again.read_text()) == json.loads(plan.read_text())
    assert len(record.read_text().splitlines()) == 3
    assert main(["plan", "show", str(plan)]) == 0
    assert capsys.readouterr().out.count("measured on cpu (1 prompts) in batches of 1") == 2
    out = tmp_path / "run"
    assert main(["run", "--model", str(experts_dir), "--plan", str(plan), "--prompt", PROMPT,
                 "--device", "cpu", "--backend", "torch", "--out", str(out)]) == 0
    assert set(json.loads((out / "metrics.json").read_text())["run"]["experts"]) == set(RANGES)


def test_compile_refusals_write_no_plan(traces_dir, tmp_path, capsys):
    plan = tmp_path / "plan.json"
    assert main(["compile-policy", str(traces_dir), "--out", str(plan), "--calibrate",
                 "--target-speedup", "1.2", "--refine", "1"]) == 1
    assert "--refine is not supported for a two-expert" in capsys.readouterr().err
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "experts.json").write_text("{")
    assert main(["compile-policy", str(broken), "--out", str(plan)]) == 1
    assert "experts.json is unreadable" in capsys.readouterr().err
    assert not plan.exists()
