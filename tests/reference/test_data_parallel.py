"""Data-parallel training over 2 gloo ranks is the single-process run: same batches, same steps."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from ditplan.reference import training
from ditplan.reference.training import Shard, TrainConfig, Trainer
from tests.reference.test_training import _tool

# The smoke recipe (tools/train_reference.py's SMOKE_DEFAULTS) at batch 4: 2 clips per rank.
SMOKE = dict(preset="smoke", device="cpu", compile=False, batch_size=4, max_steps=2,
             log_every=1, save_every=0, warmup_steps=2, total_steps=20, rewarm_steps=2)
# The same sums in another order (per-rank means of 2 samples, then the mean of the two, vs one
# mean of 4): float32 rounding, 6e-8 relative per operation; ~1e-7 measured on both steps'
# losses and grad norms, so 1e-6 leaves room for other CPUs' kernels and still fails on any
# change of recipe (another sample, sigma or noise moves the loss by percents).
RTOL = 1e-6


def _config(out: Path, **changes) -> TrainConfig:
    return TrainConfig(out=out, **{**SMOKE, **changes})


def _logged_steps(trainer: Trainer) -> list[tuple[int, float, float]]:
    """Runs `trainer` and returns (step, loss, grad norm) as `_TrainLoop` logged them (every
    step at log_every=1), unrounded."""
    steps = []

    class Steps(logging.Handler):
        def emit(self, record):
            if record.msg.startswith("step %d  loss"):
                steps.append(record.args[:2] + record.args[3:4])

    handler, level = Steps(), training.logger.level
    training.logger.addHandler(handler)
    training.logger.setLevel(logging.INFO)
    try:
        trainer.run()
    finally:
        training.logger.removeHandler(handler)
        training.logger.setLevel(level)
    return steps


def _files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) if folder.exists() else []


# Functions run on each of the two ranks (importable by name for the spawned processes).

def rank_train(root: str) -> dict:
    """Trains the smoke recipe as this rank, in its own out folder (to see who writes)."""
    out = Path(root) / f"rank{dist.get_rank()}"
    trainer = Trainer(_config(out, export=out / "export"),
                      shard=Shard(dist.get_rank(), dist.get_world_size()))
    steps = _logged_steps(trainer)
    weights = {name: p.detach().clone() for name, p in trainer.named_params}
    return dict(steps=steps, weights=weights, files=_files(out))


def rank_out_of_time(root: str) -> list[str]:
    """Rank 1's budget is spent, rank 0's is not: both must stop before the first step."""
    out = Path(root) / f"rank{dist.get_rank()}"
    started = time.monotonic() - (120 if dist.get_rank() == 1 else 0)
    config = _config(out, max_steps=None, time_budget_min=1.0)
    Trainer(config, started, Shard(dist.get_rank(), dist.get_world_size())).run()
    return _files(out)


def rank_tool(out: str) -> int:
    """tools/train_reference.py as torchrun would start this rank (the group is already
    joined, so the tool's `joined` uses it); the same --out on both ranks."""
    env = dict(RANK=str(dist.get_rank()), LOCAL_RANK=str(dist.get_rank()),
               WORLD_SIZE=str(dist.get_world_size()), MASTER_ADDR="localhost",
               MASTER_PORT="29500")
    saved = {name: os.environ.get(name) for name in env}
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    os.environ.update(env)
    try:
        return _tool().main(["--smoke", "--out", out, "--batch-size", "4", "--max-steps", "2"])
    finally:
        for name, value in saved.items():
            if value is None:
                del os.environ[name]
            else:
                os.environ[name] = value
        root.handlers[:] = handlers  # undo the tool's logging.basicConfig in this shared rank
        root.setLevel(level)


def test_two_ranks_train_the_single_process_run(gloo_ranks, tmp_path):
    single = _logged_steps(Trainer(_config(tmp_path / "single")))
    ranks = gloo_ranks.run(rank_train, str(tmp_path))
    assert [s[0] for s in single] == [1, 2]
    for rank in ranks:
        # The step-1 grad norm checks step 1's gradient; step 2's also checks step 1's update.
        # Weights are compared with the single process only through it: AdamW's first update
        # is ~lr * sign(grad) per weight, so a gradient component within rounding of zero may
        # move its weight by up to 2 * lr either way while the gradients agree to ~1e-7; and
        # Adam hardly sees a gradient's scale (summed instead of averaged gradients would move
        # the weights alike), which the grad norm does.
        for (step, loss, grad), (step1, loss1, grad1) in zip(rank["steps"], single, strict=True):
            assert step == step1
            assert loss == pytest.approx(loss1, rel=RTOL)  # the whole batch's, not the shard's
            assert grad == pytest.approx(grad1, rel=RTOL)
    assert ranks[0]["steps"] == ranks[1]["steps"]  # one all-reduce: bitwise the same on both
    w0, w1 = ranks[0]["weights"], ranks[1]["weights"]
    assert w0.keys() == w1.keys() and all(torch.equal(w0[k], w1[k]) for k in w0)
    assert "checkpoint/state.json" in ranks[0]["files"]
    assert "export/model_index.json" in ranks[0]["files"]
    assert ranks[1]["files"] == []  # rank 1 wrote nothing


def test_a_rank_out_of_time_stops_all_ranks(gloo_ranks, tmp_path):
    # Without a shared decision rank 0 would step alone and its gradient all-reduce would time
    # out (tests/gloo.py: 30 s) instead of returning.
    assert gloo_ranks.run(rank_out_of_time, str(tmp_path)) == [[], []]


def test_tool_under_torchrun_trains_one_run_written_by_rank_0(gloo_ranks, tmp_path):
    assert gloo_ranks.run(rank_tool, str(tmp_path / "run")) == [0, 0]
    state = (tmp_path / "run" / "checkpoint" / "state.json").read_text()
    assert '"step": 2' in state and '"batch_size": 4' in state


def test_shard_takes_its_contiguous_slice():
    x = torch.arange(12).reshape(6, 2)  # [B, 2]
    assert torch.equal(Shard(1, 2).take(x), x[3:])
    assert torch.equal(Shard(0, 3).take(x), x[:2])
    assert torch.equal(Shard().take(x), x)
    assert Shard().main and not Shard(1, 2).main


def test_batch_that_does_not_split_over_the_ranks_is_refused(tmp_path, monkeypatch, capsys):
    with pytest.raises(ValueError, match="--batch-size 3 does not split evenly over 2"):
        Trainer(_config(tmp_path, batch_size=3), shard=Shard(1, 2))
    tool = _tool()
    for name, value in dict(RANK="1", LOCAL_RANK="1", WORLD_SIZE="2", MASTER_ADDR="localhost",
                            MASTER_PORT="29500").items():
        monkeypatch.setenv(name, value)
    with pytest.raises(SystemExit) as exit_:
        tool.main(["--smoke", "--out", str(tmp_path / "run"), "--batch-size", "3"])
    assert exit_.value.code == 2
    assert "--batch-size 3 does not split evenly over 2" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_other_launchers_are_refused(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "2")  # mpirun: no torchrun environment
    with pytest.raises(SystemExit) as exit_:
        _tool().main(["--smoke", "--out", str(tmp_path / "run")])
    assert exit_.value.code == 2
    assert "without torchrun's environment" in capsys.readouterr().err
