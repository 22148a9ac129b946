"""``ditplan run`` as two torchrun ranks (gloo, CPU): rank 0 alone writes, frames equal one
process; launches it cannot join are refused before any work."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ditplan.policy.plan import AttentionSpec, BlockRun, Workload
from ditplan.policy.plan_io import save_plan
from ditplan.runtime import launch
from ditplan.runtime.cli import main

# 4 frames x 16 x 16 px -> 4 x 8 x 8 = 256 tokens, 128 a rank; 4 steps with CFG.
WORKLOAD = Workload(steps=4, height=16, width=16, frames=4, guidance_scale=4.0, cfg=True,
                    tokens_grid=(4, 8, 8))
SPARSE = AttentionSpec(density=0.5, head_densities=(0.3, 0.5), block_size=64, tile=(1, 4, 4),
                       sink=False, dense_steps=(0,))


def write_plan(model_dir, path):
    """A plan for the saved tiny reference pipeline: sparse layers, blocks.1 cached."""
    from ditplan.runtime.loading import load_pipeline
    from tests.factories import tiny_wan_plan

    transformer = load_pipeline(str(model_dir)).transformer
    plan = tiny_wan_plan(transformer, densities=(1.0, 1.0))
    layers = {name: dataclasses.replace(layer, attention=SPARSE)
              for name, layer in plan.layers.items()}
    runs = (BlockRun(("blocks.1",), {"cond": "CCRC", "uncond": "CCCR"}),)
    return save_plan(dataclasses.replace(plan, workload=WORKLOAD, layers=layers, runs=runs), path)


def run_args(model_dir, plan, out) -> list[str]:
    return ["run", "--model", str(model_dir), "--plan", str(plan), "--device", "cpu",
            "--backend", "torch", "--compare-dense", "--out", str(out)]


def rank_cli(model_dir: str, plan: str, folder: str, *extra: str):
    """One torchrun rank (its environment as torchrun sets it); rank 0 also runs alone.
    ``extra``: more ``ditplan run`` arguments, for the ranks only."""
    import torch.distributed as dist

    rank = dist.get_rank()
    torchrun = dict(WORLD_SIZE="2", RANK=str(rank), LOCAL_RANK=str(rank),
                    MASTER_ADDR="127.0.0.1", MASTER_PORT="29500")
    os.environ.update(torchrun)
    try:  # each rank names its own folder, so the test sees which ranks wrote
        code = main([*run_args(model_dir, plan, f"{folder}/rank{rank}"), *extra])
    finally:
        for name in torchrun:
            del os.environ[name]
    alone = main(run_args(model_dir, plan, f"{folder}/alone")) if rank == 0 and not extra else None
    return code, alone


def image(path) -> np.ndarray:
    return np.asarray(Image.open(path), dtype=np.int16)


def test_two_ranks_write_once_and_match_one_process(gloo_ranks, model_dir, tmp_path):
    plan = write_plan(model_dir, tmp_path / "plan.json")
    (code0, alone), (code1, _) = gloo_ranks.run(rank_cli, str(model_dir), str(plan),
                                                str(tmp_path))
    assert code0 == code1 == alone == 0
    assert not (tmp_path / "rank1").exists()  # only rank 0 writes
    parallel, single = tmp_path / "rank0", tmp_path / "alone"
    assert (parallel / "video.mp4").stat().st_size > 0
    metrics = json.loads((parallel / "metrics.json").read_text())
    reference = json.loads((single / "metrics.json").read_text())
    assert metrics["parallel"] == {"ranks": 2, "ulysses_degree": 2}
    assert "parallel" not in reference
    # the ranks' densities averaged: the one-process figure
    assert metrics["run"]["attention_density"] == pytest.approx(
        reference["run"]["attention_density"], abs=1e-6)
    assert metrics["run"]["attention_density"] < 0.95
    for name in ("frames.png", "dense_frames.png"):  # uint8: equal up to rounding
        assert np.abs(image(parallel / name) - image(single / name)).max() <= 1
    assert metrics["vs_dense"]["psnr_db"] > 10


def test_two_ranks_compiled_match_two_ranks_eager(gloo_ranks, model_dir, tmp_path):
    """`--compile` under context parallelism: the plan's blocks compiled beneath its hooks, then
    (after remove(), diffusers' parallel hooks staying) dense's; dynamo's eager backend runs the
    same ops, so the frames equal the eager parallel run's."""
    plan = write_plan(model_dir, tmp_path / "plan.json")
    for name, extra in (("eager", ()), ("compiled", ("--compile", "eager"))):
        results = gloo_ranks.run(rank_cli, str(model_dir), str(plan), str(tmp_path / name),
                                 *extra)
        assert [code for code, _ in results] == [0, 0]
    eager, compiled = tmp_path / "eager" / "rank0", tmp_path / "compiled" / "rank0"
    assert json.loads((compiled / "metrics.json").read_text())["run"]["warmup_runs"] == 1
    for name in ("frames.png", "dense_frames.png"):
        assert np.array_equal(image(compiled / name), image(eager / name))


@pytest.mark.parametrize("environment, message", [
    (dict(OMPI_COMM_WORLD_SIZE="2"), "without torchrun's environment (RANK, LOCAL_RANK, "
                                     "WORLD_SIZE, MASTER_ADDR, MASTER_PORT unset"),
    (dict(WORLD_SIZE="2", RANK="0"), "(LOCAL_RANK, MASTER_ADDR, MASTER_PORT unset"),
    (dict(WORLD_SIZE="2", RANK="1", LOCAL_RANK="1", MASTER_ADDR="x", MASTER_PORT="1"),
     "--nproc 2 launches torchrun itself, but this process is already rank 1 of 2"),
])
def test_launches_run_cannot_join_are_refused_before_any_work(tmp_path, capsys, monkeypatch,
                                                             environment, message):
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    out = tmp_path / "run"
    argv = ["run", "--model", "reference", "--device", "cpu", "--out", str(out)]
    if "--nproc" in message:
        argv += ["--nproc", "2"]
    assert main(argv) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_other_commands_are_refused_under_torchrun(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["plan", "show", str(tmp_path / "plan.json")]) == 2
    assert "plan runs in one process (only `ditplan run`" in capsys.readouterr().err


def test_nproc_runs_the_command_as_two_torchrun_ranks(model_dir, tmp_path):
    plan, out = write_plan(model_dir, tmp_path / "plan.json"), tmp_path / "run"
    root = Path(__file__).resolve().parents[2]
    shims = Path(__file__).with_name("torchrun_shims")  # each rank applies tests.gloo's shims
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(shims), str(root)])}
    command = [sys.executable, "-m", "ditplan.runtime.cli", *run_args(model_dir, plan, out),
               "--nproc", "2"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count(f"wrote {out}/video.mp4") == 1  # rank 0 reports
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["parallel"]["ranks"] == 2 and metrics["vs_dense"]["psnr_db"] > 10


def test_nproc_relaunches_the_same_command_under_torchrun(monkeypatch):
    commands = []

    def fake_run(command, check):
        commands.append(command)
        return type("Completed", (), {"returncode": 3})()

    monkeypatch.setattr(launch.subprocess, "run", fake_run)
    argv = ["run", "--plan", "p.json", "--nproc", "2", "--seed", "7", "--nproc=2"]
    assert main(argv) == 3  # torchrun's exit status
    (command,) = commands
    assert command[1:6] == ["-m", "torch.distributed.run", "--standalone",
                            "--nproc-per-node=2", "-m"]
    assert command[6:] == ["ditplan.runtime.cli", "run", "--plan", "p.json", "--seed", "7"]


def test_more_ranks_than_gpus_on_a_host_are_refused():
    import torch

    gpus = torch.cuda.device_count()
    rank = launch.Launch(world=gpus + 1, rank=gpus, local_rank=gpus)
    with pytest.raises(launch.LaunchError, match=f"this host has {gpus} GPU"):
        with launch.joined(rank, "cuda"):
            pass


def test_a_single_process_is_no_launch():
    assert launch.detect_launch({}) is None
    assert launch.detect_launch({"WORLD_SIZE": "1", "OMPI_COMM_WORLD_SIZE": "1"}) is None
    torchrun = dict(WORLD_SIZE="4", RANK="3", LOCAL_RANK="1", MASTER_ADDR="h", MASTER_PORT="1")
    assert launch.detect_launch(torchrun) == launch.Launch(world=4, rank=3, local_rank=1)
