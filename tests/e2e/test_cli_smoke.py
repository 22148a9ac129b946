"""The three commands end to end on a tiny reference pipeline on CPU, plus bad input."""

from __future__ import annotations

import json

import pytest

from ditplan.runtime.cli import main

PROMPT = "a red circle slowly moves right"
# 4 frames x 16 x 16 px -> 4 x 8 x 8 tokens = 4 blocks of 64; 4 steps with CFG.
WORKLOAD = ["--steps", "4", "--frames", "4", "--height", "16", "--width", "16"]


def _run(model_dir, out, *args: str) -> int:
    """``ditplan run --model MODEL_DIR ... --out OUT``; the exit code."""
    return main(["run", "--model", str(model_dir), *args, "--out", str(out)])


@pytest.fixture(scope="module")
def traces_dir(model_dir, tmp_path_factory):
    traces = tmp_path_factory.mktemp("flow") / "traces"
    profile = [
        "profile",
        "--model",
        str(model_dir),
        "--out",
        str(traces),
        "--prompts",
        PROMPT,
        "--seeds",
        "0",
        "--block-size",
        "64",
        "--tile",
        "1x4x4",
        "--device",
        "cpu",
        "--no-progress",
        *WORKLOAD,
    ]
    assert main(profile) == 0
    return traces


@pytest.fixture(scope="module")
def plan_path(traces_dir):
    traces = traces_dir
    plan = traces.parent / "plan.json"
    assert main(["compile-policy", str(traces), "--out", str(plan), "--quality", "fast"]) == 0
    return plan


def test_profile_compile_run(model_dir, plan_path, tmp_path, capsys):
    plan = json.loads(plan_path.read_text())
    assert plan["workload"]["frames"] == 4 and plan["workload"]["tokens_grid"] == [4, 8, 8]
    assert main(["plan", "show", str(plan_path)]) == 0
    assert "predicted speedup" in capsys.readouterr().out
    out = tmp_path / "run"
    code = _run(model_dir, out, "--plan", str(plan_path), "--prompt", PROMPT, "--device", "cpu",
                "--backend", "torch", "--compare-dense", "--repeats", "2")
    assert code == 0
    assert (out / "video.mp4").stat().st_size > 0 and (out / "frames.png").stat().st_size > 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["workload"]["steps"] == 4
    assert 0 < metrics["run"]["attention_density"] <= 1
    assert metrics["vs_dense"]["psnr_db"] > 10 and metrics["speedup_vs_dense"] > 0
    for kind in ("dense", "run"):  # --repeats 2: both timed twice, the median reported
        runs = metrics[kind]["wall_s_runs"]
        assert len(runs) == 2 and metrics[kind]["wall_s"] == pytest.approx(sum(runs) / 2)


def test_compiled_run_through_the_cli(model_dir, plan_path, tmp_path):
    """`--compile eager` (dynamo's eager backend: no C++ build on a CI machine): the plan's blocks
    and then dense's are compiled, each side warmed by a generation, and the plan's output is
    the eager plan's bit for bit (the same ops)."""
    import torch._dynamo

    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    args = ["--plan", str(plan_path), "--prompt", PROMPT, "--device", "cpu", "--backend", "torch"]
    assert _run(model_dir, tmp_path / "compiled", *args, "--compile", "eager",
                "--compare-dense") == 0
    assert counters["stats"]["unique_graphs"] >= 2  # the plan's block graphs, then dense's
    assert _run(model_dir, tmp_path / "eager", *args) == 0
    compiled, eager = (json.loads((tmp_path / name / "metrics.json").read_text())
                       for name in ("compiled", "eager"))
    assert compiled["run"]["warmup_runs"] == compiled["dense"]["warmup_runs"] == 1
    assert compiled["config"]["compile"] == str({"backend": "eager"})
    frames = [(tmp_path / name / "frames.png").read_bytes() for name in ("compiled", "eager")]
    assert frames[0] == frames[1]


def test_compile_backend_errors_are_clear_and_leave_no_output(model_dir, plan_path, tmp_path,
                                                              capsys):
    import torch._dynamo

    @torch._dynamo.register_backend(name="ditplan_test_broken")
    def broken(graph, example_inputs):
        raise RuntimeError("no C compiler here")

    args = ["--plan", str(plan_path), "--prompt", PROMPT, "--device", "cpu", "--backend", "torch"]
    for backend, message in (("nosuch", "torch.compile has no backend 'nosuch'"),
                             ("ditplan_test_broken", "ditplan_test_broken backend failed: no C "
                                                     "compiler here; run without --compile")):
        torch._dynamo.reset()
        out = tmp_path / backend
        assert _run(model_dir, out, *args, "--compile", backend) == 2
        assert message in capsys.readouterr().err
        assert not out.exists()


def test_run_refuses_a_plan_for_another_workload(model_dir, plan_path, tmp_path, capsys):
    out = tmp_path / "run"
    code = _run(model_dir, out, "--plan", str(plan_path), "--frames", "8", "--device", "cpu")
    assert code == 2
    assert "--frames 8 (plan: 4)" in capsys.readouterr().err
    assert not out.exists()


def test_broken_plan_and_truncated_trace_leave_no_output(model_dir, plan_path, tmp_path, capsys):
    broken = tmp_path / "broken.json"
    broken.write_text(plan_path.read_text()[:-40])
    out = tmp_path / "run"
    assert _run(model_dir, out, "--plan", str(broken)) == 2
    assert "broken.json" in capsys.readouterr().err and not out.exists()

    traces = tmp_path / "traces"
    traces.mkdir()
    source = next(plan_path.parent.joinpath("traces").rglob("*.parquet"))
    (traces / "cut.parquet").write_bytes(source.read_bytes()[:200])
    new_plan = tmp_path / "plan.json"
    assert main(["compile-policy", str(traces), "--out", str(new_plan)]) != 0
    assert "cut.parquet" in capsys.readouterr().err and not new_plan.exists()


def test_building_the_cli_does_not_import_torch():
    import subprocess
    import sys

    code = (
        "import sys; from ditplan.runtime.cli import build_parser; build_parser(); "
        "print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"  # compile-policy and plan show stay torch-free


def test_missing_ffmpeg_keeps_metrics_and_frames(model_dir, tmp_path, capsys, monkeypatch):
    import imageio.v2 as imageio

    def no_ffmpeg(*args, **kwargs):
        raise ImportError("The `FFMPEG` plugin is not installed.")

    monkeypatch.setattr(imageio, "get_writer", no_ffmpeg)
    out = tmp_path / "run"
    code = _run(model_dir, out, "--prompt", PROMPT, "--device", "cpu", *WORKLOAD,
                "--guidance-scale", "4")
    assert code == 1
    assert "pip install imageio-ffmpeg" in capsys.readouterr().err
    assert (out / "metrics.json").exists() and (out / "frames.png").exists()
    assert not list(out.glob("*.mp4*"))  # no partial video


def test_calibrated_compile_measures_candidates_and_resumes(model_dir, traces_dir, tmp_path,
                                                            capsys, monkeypatch):
    plan = tmp_path / "calibrated.json"
    argv = ["compile-policy", str(traces_dir), "--out", str(plan), "--min-psnr", "5",
            "--calibrate", "--model", str(model_dir), "--device", "cpu", "--candidates", "3",
            "--calibration-prompts", "a blue square quickly moves up"]
    assert main(argv) == 0
    said = capsys.readouterr().out
    assert "measured" in said and "best of 3 candidates" in said
    calibration = json.loads(plan.read_text())["provenance"]["calibration"]
    assert calibration["prompts"] == 1 and calibration["psnr_db"] >= 5
    record = tmp_path / "calibrated.calibration.jsonl"
    assert len(record.read_text().splitlines()) == 3
    # resumed: every candidate is read back, nothing is generated again
    from ditplan.runtime import calibrate

    def refuse(*args, **kwargs):
        raise AssertionError("a finished candidate was measured again")

    monkeypatch.setattr(calibrate.Calibrator, "measure", refuse)
    again = tmp_path / "again.json"
    assert main([*argv[:3], str(again), *argv[4:], "--calibration-record", str(record)]) == 0
    assert json.loads(again.read_text())["provenance"]["calibration"] == calibration


def test_calibration_batch_reaches_the_generation(model_dir, traces_dir, tmp_path,
                                                  monkeypatch):
    from ditplan.runtime import calibrate

    generated = calibrate.generate_samples
    batches = []

    def counting(pipe, prompts, *args):
        batches.append(len(prompts))
        return generated(pipe, prompts, *args)

    monkeypatch.setattr(calibrate, "generate_samples", counting)
    plan = tmp_path / "calibrated.json"
    assert main(["compile-policy", str(traces_dir), "--out", str(plan), "--min-psnr", "5",
                 "--calibrate", "--model", str(model_dir), "--device", "cpu", "--candidates",
                 "2", "--calibration-prompts", PROMPT, "--calibration-seeds", "0", "1",
                 "--calibration-batch", "1"]) == 0
    assert batches and set(batches) == {1}  # 2 samples, one at a time


@pytest.mark.parametrize("option", ["--calibration-batch", "--calibration-repeats"])
@pytest.mark.parametrize("value", ["0", "-1", "two"])
def test_a_bad_calibration_count_is_refused_before_any_work(traces_dir, tmp_path, capsys,
                                                            option, value):
    out = tmp_path / "p.json"
    with pytest.raises(SystemExit) as exit_:
        main(["compile-policy", str(traces_dir), "--out", str(out), "--min-psnr", "5",
              "--calibrate", option, value])
    assert exit_.value.code == 2
    assert f"argument {option}:" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())  # no plan file, no calibration record


def test_calibrate_needs_a_target(traces_dir, tmp_path, capsys):
    argv = ["compile-policy", str(traces_dir), "--out", str(tmp_path / "p.json"), "--calibrate"]
    assert main(argv) == 1
    assert "--calibrate needs --target-speedup" in capsys.readouterr().err
    assert not (tmp_path / "p.json").exists()


@pytest.mark.parametrize("variable", ["WORLD_SIZE", "OMPI_COMM_WORLD_SIZE"])
def test_a_multi_process_launch_is_refused_before_any_work(tmp_path, capsys, monkeypatch,
                                                            variable):
    monkeypatch.setenv(variable, "2")
    out = tmp_path / "run"
    assert _run("reference", out, "--prompt", PROMPT, "--device", "cpu", *WORKLOAD) == 2
    assert "launched as 2 processes" in capsys.readouterr().err
    assert not out.exists()
    monkeypatch.setenv(variable, "1")
    assert main(["plan", "show", str(tmp_path / "missing.json")]) != 0  # refused as usual
    assert "launched as" not in capsys.readouterr().err
