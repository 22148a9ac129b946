"""Training: smoke run, checkpoint/resume, resume from an export, schedule, rectified-flow math,
export limits."""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import math
import time
import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ditplan.reference import export as export_module
from ditplan.reference import training
from ditplan.reference.checkpoint import (
    Checkpoint,
    CheckpointError,
    load_checkpoint,
    plan_shards,
    save_checkpoint,
)
from ditplan.reference.flow import noisy_sample, sample_sigmas, shift_sigmas
from ditplan.reference.pipeline import ReferenceVideoPipeline
from ditplan.reference.training import (
    TrainConfig,
    Trainer,
    learning_rate,
    load_resume_source,
    weighted_mse,
)
from tests.tool_scripts import load_tool

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = ROOT / "artifacts" / "models" / "ditplan-ref-t2v"


def _tool():
    return load_tool("train_reference")


def _rows(folder: Path) -> list[dict]:
    with open(folder / "checkpoint" / "loss.csv") as f:
        return list(csv.DictReader(f))


def _smoke_config(tmp_path: Path, **changes) -> TrainConfig:
    fields = dict(out=tmp_path, preset="smoke", device="cpu", compile=False, batch_size=2,
                  max_steps=2, log_every=1, save_every=0, warmup_steps=1, total_steps=20)
    return TrainConfig(**{**fields, **changes})


def test_smoke_trains_checkpoints_resumes_and_exports(tmp_path):
    tool = _tool()
    assert tool.main(["--smoke", "--out", str(tmp_path)]) == 0
    state = json.loads((tmp_path / "checkpoint" / "state.json").read_text())
    assert state["step"] == 3 and state["preset"] == "smoke"
    first = _rows(tmp_path)
    assert [r["step"] for r in first] == ["1", "2", "3"]
    assert all(float(r["loss"]) > 0 for r in first)

    with pytest.raises(SystemExit):  # an existing checkpoint is never silently restarted
        tool.main(["--smoke", "--out", str(tmp_path)])
    resumed = tmp_path / "resumed"
    assert tool.main(["--smoke", "--out", str(resumed), "--resume", str(tmp_path / "checkpoint"),
                      "--max-steps", "2", "--export", str(resumed / "export")]) == 0
    state = json.loads((resumed / "checkpoint" / "state.json").read_text())
    assert state["step"] == 5
    rows = _rows(resumed)
    assert rows[:3] == first and [r["step"] for r in rows[3:]] == ["4", "5"]
    pipe = ReferenceVideoPipeline.from_pretrained(resumed / "export")
    assert pipe.transformer.config.num_layers == 2


def test_resume_restores_weights_and_second_moments(tmp_path):
    config = TrainConfig(out=tmp_path, preset="smoke", device="cpu", compile=False, batch_size=2,
                         max_steps=2, log_every=1, save_every=0, warmup_steps=1)
    trainer = Trainer(config)
    trainer.run()
    saved = load_checkpoint(tmp_path / "checkpoint")
    assert saved.tensors["transformer.proj_out.weight"].dtype == torch.bfloat16
    assert saved.tensors["transformer.scale_shift_table"].dtype == torch.float32  # fp32 module
    assert saved.tensors["text_encoder.proj.weight"].dtype == torch.float32
    resumed = Trainer(config)
    resumed.load(saved)
    assert resumed.step == 2
    for (name, p), (_, q) in zip(trainer.named_params, resumed.named_params, strict=True):
        assert torch.equal(p.detach().to(saved.tensors[name].dtype).float(), q.detach()), name
        v = trainer.optimizer.state[p]["exp_avg_sq"]
        assert torch.equal(v.bfloat16().float(), resumed.optimizer.state[q]["exp_avg_sq"]), name
        assert not resumed.optimizer.state[q]["exp_avg"].any()


def test_export_from_checkpoint_equals_export_from_live_model(tmp_path):
    config = TrainConfig(out=tmp_path, preset="smoke", device="cpu", compile=False, batch_size=2,
                         max_steps=2, log_every=1, save_every=0, warmup_steps=1,
                         export=tmp_path / "live")
    Trainer(config).run()
    resumed = Trainer(TrainConfig(**{**vars(config), "export": None}))
    resumed.load(load_checkpoint(tmp_path / "checkpoint"))
    export_module.export_pipeline(resumed.transformer, resumed.text_encoder, resumed.preset,
                                  tmp_path / "from_checkpoint")
    for part in ("transformer", "text_encoder"):
        live = load_file(tmp_path / "live" / part / "diffusion_pytorch_model.safetensors")
        again = load_file(tmp_path / "from_checkpoint" / part /
                          "diffusion_pytorch_model.safetensors")
        assert live.keys() == again.keys()
        assert all(torch.equal(live[k], again[k]) for k in live), part


def test_batches_depend_only_on_seed_and_step(tmp_path):
    config = TrainConfig(out=tmp_path, preset="smoke", device="cpu", compile=False, batch_size=2)
    a, b = Trainer(config), Trainer(config)
    xa, _, ida, _ = a._batch(7)
    xb, _, idb, _ = b._batch(7)
    xc, _, _, _ = a._batch(8)
    assert torch.equal(xa, xb) and torch.equal(ida, idb) and not torch.equal(xa, xc)


def test_clip_frames_stage_trains_on_shorter_clips_of_the_same_model(tmp_path):
    short = Trainer(_smoke_config(tmp_path, clip_frames=2))
    x0, _, _, _ = short._batch(0)  # x0: [B, 3, F, H, W]
    assert x0.shape[2] == 2 and x0.shape[3:] == (16, 16)
    short.train_step()
    short.save()
    full = Trainer(_smoke_config(tmp_path, resume=tmp_path / "checkpoint"))
    full.load(load_resume_source(tmp_path / "checkpoint"))
    assert full._batch(1)[0].shape[2] == 4  # the preset's frames again; same weights resume
    assert full.step == 1


def test_exhausted_time_budget_takes_no_step_and_writes_nothing(tmp_path):
    config = TrainConfig(out=tmp_path, preset="smoke", device="cpu", compile=False,
                         batch_size=2, time_budget_min=1.0)
    Trainer(config, started_at=time.monotonic() - 120).run()
    assert not (tmp_path / "checkpoint").exists()


def test_time_budget_is_not_spent_on_the_compiling_first_step(tmp_path, monkeypatch):
    """A first step that compiles for 100 s must not stand for every step: a 3.2-minute budget
    (15 s reserved for the save) then still holds 76 one-second steps after it, not none."""
    clock = [0.0]
    monkeypatch.setattr(training, "time", types.SimpleNamespace(monotonic=lambda: clock[0]))
    config = _smoke_config(tmp_path, max_steps=None, time_budget_min=3.2, log_every=1000)
    trainer = Trainer(config, started_at=0.0)

    def timed_step():  # the step's work without training: only its duration matters here
        clock[0] += 100.0 if trainer.step == 0 else 1.0
        trainer.step += 1
        zero = torch.zeros(())
        return zero, zero, None

    monkeypatch.setattr(trainer, "train_step", timed_step)
    trainer.run()
    # after step n: 100 + (n - 1) s elapsed; it stops once that + 2 steps + 15 s passes 192 s
    assert trainer.step == 77
    assert load_checkpoint(tmp_path / "checkpoint").state["step"] == 77


def test_resume_refuses_another_preset(tmp_path):
    config = TrainConfig(out=tmp_path, preset="smoke", device="cpu", compile=False, batch_size=2,
                         max_steps=1, log_every=1, save_every=0)
    Trainer(config).run()
    ckpt = load_checkpoint(tmp_path / "checkpoint")
    ckpt.state["preset"] = "reference"
    with pytest.raises(ValueError, match="preset"):
        Trainer(config).load(ckpt)


def test_learning_rate_warmup_cosine_floor():
    config = TrainConfig(out=Path("."), lr=1e-3, warmup_steps=10, total_steps=110,
                         min_lr_ratio=0.1)
    assert learning_rate(config, 0) == pytest.approx(1e-4)
    assert learning_rate(config, 9) == pytest.approx(1e-3)
    assert learning_rate(config, 60) == pytest.approx(0.55e-3)
    assert learning_rate(config, 110) == pytest.approx(1e-4)
    assert learning_rate(config, 500) == pytest.approx(1e-4)


def test_checkpoint_shards_round_trip_and_detect_damage(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {f"w{i}": torch.randn(64, 64, generator=g) for i in range(5)}  # 16 KiB each
    assert [len(s) for s in plan_shards(tensors, 40_000)] == [2, 2, 1]
    folder = save_checkpoint(tmp_path / "ck", Checkpoint(tensors, {"step": 3}, "a,b\n"), 40_000)
    shards = sorted(folder.glob("shard-*.safetensors"))
    assert len(shards) == 3
    loaded = load_checkpoint(folder)
    assert loaded.state == {"step": 3} and loaded.loss_csv == "a,b\n"
    assert all(torch.equal(tensors[k], loaded.tensors[k]) for k in tensors)
    # a crash between the two renames leaves <name>.old, which is still found
    folder.rename(tmp_path / "ck.old")
    assert load_checkpoint(tmp_path / "ck").state == {"step": 3}
    (tmp_path / "ck.old").rename(folder)
    shards[1].unlink()
    with pytest.raises(CheckpointError, match="missing"):
        load_checkpoint(folder)
    with pytest.raises(CheckpointError, match="no checkpoint"):
        load_checkpoint(tmp_path / "nowhere")


def test_export_over_the_size_limit_leaves_nothing(tmp_path, monkeypatch):
    trainer = Trainer(TrainConfig(out=tmp_path, preset="smoke", device="cpu", compile=False))
    monkeypatch.setattr(export_module, "MAX_EXPORT_BYTES", 1000)
    with pytest.raises(export_module.ExportTooLargeError):
        export_module.export_pipeline(trainer.transformer, trainer.text_encoder, trainer.preset,
                                      tmp_path / "model")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.filterwarnings("ignore:`torch_dtype` is deprecated")
def test_export_keeps_other_files_and_fp32_modules(tmp_path):
    trainer = Trainer(TrainConfig(out=tmp_path, preset="smoke", device="cpu", compile=False))
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "README.md").write_text("card")
    export_module.export_pipeline(trainer.transformer, trainer.text_encoder, trainer.preset,
                                  tmp_path / "model")
    assert (tmp_path / "model" / "README.md").read_text() == "card"
    pipe = ReferenceVideoPipeline.from_pretrained(tmp_path / "model", torch_dtype=torch.bfloat16)
    assert pipe.transformer.scale_shift_table.dtype == torch.float32
    assert pipe.transformer.proj_out.weight.dtype == torch.bfloat16


def test_rectified_flow_endpoints_and_sigma_distribution():
    x0, noise = torch.randn(4, 3, 2, 4, 4), torch.randn(4, 3, 2, 4, 4)
    ends = noisy_sample(x0, noise, torch.tensor([0.0, 1.0, 0.0, 1.0]))
    assert torch.equal(ends[0], x0[0]) and torch.equal(ends[1], noise[1])
    s = torch.linspace(0, 1, 11)
    assert torch.allclose(shift_sigmas(s, 1.0), s)
    assert (shift_sigmas(s[1:-1], 2.0) > s[1:-1]).all()
    sigmas = sample_sigmas(20_000, torch.Generator().manual_seed(0), shift=2.0)
    assert sigmas.min() > 0 and sigmas.max() < 1
    # logit-normal(0, 1) has median 0.5; shift 2 moves it to 2/3; 10% uniform barely moves it
    assert sigmas.median().item() == pytest.approx(2 / 3, abs=0.02)


def test_reference_preset_meets_the_size_and_workload_limits():
    from ditplan.reference.config import REFERENCE, build_caption_encoder, build_transformer

    assert REFERENCE.transformer["num_layers"] >= 8
    assert REFERENCE.video_tokens() == 9216  # >= 8,192 required at the evaluation workload
    params = sum(p.numel() for p in build_transformer(REFERENCE).parameters())
    params += sum(p.numel() for p in build_caption_encoder(REFERENCE).parameters())
    assert 6e6 <= params <= 10e6
    assert 2 * params < 25e6  # shipped in bf16 (the encoder's 0.4M in fp32 adds 0.8 MB)
    assert 4 * params < 60 * 2**20  # checkpoint: bf16 weights + bf16 exp_avg_sq


def test_smoke_resume_from_export_continues_step_count_and_loss_curve(tmp_path):
    tool = _tool()
    first, second = tmp_path / "first", tmp_path / "second"
    assert tool.main(["--smoke", "--out", str(first), "--export", str(first / "export")]) == 0
    record = json.loads((first / "export" / "training_state.json").read_text())
    assert record["step"] == 3 and record["preset"] == "smoke"
    assert (first / "export" / "loss.csv").read_text() == (first / "checkpoint" /
                                                            "loss.csv").read_text()
    assert tool.main(["--smoke", "--out", str(second), "--resume", str(first / "export"),
                      "--max-steps", "2", "--export", str(second / "export")]) == 0
    state = json.loads((second / "checkpoint" / "state.json").read_text())
    assert state["step"] == 5 and state["optimizer_restarted_at"] == 3
    assert state["train_seconds"] > record["train_seconds"]
    rows = _rows(second)
    assert rows[:3] == _rows(first) and [r["step"] for r in rows[3:]] == ["4", "5"]
    again = json.loads((second / "export" / "training_state.json").read_text())
    assert again["step"] == 5
    assert again["weights_sha256"] != record["weights_sha256"]  # it trained on


def test_loading_an_export_gives_the_shipped_weights_bitwise_and_restarts_adam(tmp_path):
    Trainer(_smoke_config(tmp_path, export=tmp_path / "export")).run()
    config = _smoke_config(tmp_path, rewarm_steps=4)
    resumed = Trainer(config)
    resumed.load(load_resume_source(tmp_path / "export"))
    assert resumed.step == 2 and resumed.restarted_at == 2
    shipped = {f"{part}.{name}": tensor for part in ("transformer", "text_encoder")
               for name, tensor in load_file(tmp_path / "export" / part /
                                             "diffusion_pytorch_model.safetensors").items()}
    assert shipped.keys() == {name for name, _ in resumed.named_params}
    for name, p in resumed.named_params:  # bf16/fp32 -> fp32 is exact, so equality is bitwise
        assert torch.equal(p.detach(), shipped[name].float()), name
    assert len(resumed.optimizer.state) == 0
    resumed.train_step()
    # warmup 1, cosine over 19 steps from 5e-4 to 5e-5; step 2 is 1/19 into it, re-warm 1/4
    cosine = 5e-5 + (5e-4 - 5e-5) * 0.5 * (1 + math.cos(math.pi * 1 / 19))
    assert resumed.optimizer.param_groups[0]["lr"] == pytest.approx(cosine / 4, rel=1e-12)
    p = resumed.named_params[0][1]
    assert resumed.optimizer.state[p]["step"].item() == 1  # Adam's bias correction starts over


def test_checkpoint_written_during_a_rewarm_keeps_it(tmp_path):
    Trainer(_smoke_config(tmp_path, export=tmp_path / "export")).run()
    config = _smoke_config(tmp_path / "b", resume=tmp_path / "export", max_steps=1,
                           rewarm_steps=4)
    Trainer(config).run()
    again = Trainer(config)
    again.load(load_resume_source(tmp_path / "b" / "checkpoint"))
    assert again.step == 3 and again.restarted_at == 2  # not restarted again: moments exist
    assert len(again.optimizer.state) == len(again.named_params)
    assert again.learning_rate(3) == pytest.approx(learning_rate(config, 3) * 2 / 4, rel=1e-12)


def test_learning_rate_rewarm_after_restart_then_cosine():
    config = TrainConfig(out=Path("."), lr=1e-3, warmup_steps=10, total_steps=110,
                         min_lr_ratio=0.1, rewarm_steps=4)

    def cosine(step):  # the schedule without a restart, written out
        return 1e-4 + 0.9e-3 * 0.5 * (1 + math.cos(math.pi * (step - 10) / 100))

    got = [learning_rate(config, s, restarted_at=60) for s in range(58, 67)]
    want = [cosine(58), cosine(59), *(cosine(s) * (s - 59) / 4 for s in range(60, 64)),
            cosine(64), cosine(65), cosine(66)]
    assert got == pytest.approx(want, rel=1e-12)  # same formula, rounding order may differ
    assert learning_rate(config, 60, restarted_at=60) == pytest.approx(0.55e-3 / 4)
    no_rewarm = TrainConfig(**{**vars(config), "rewarm_steps": 0})
    assert learning_rate(no_rewarm, 60, restarted_at=60) == learning_rate(config, 60)


def test_resume_source_that_is_neither_checkpoint_nor_export_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("not a model")
    with pytest.raises(CheckpointError, match="neither a training checkpoint"):
        load_resume_source(tmp_path)
    with pytest.raises(CheckpointError, match="neither"):
        load_resume_source(tmp_path / "missing")
    tool = _tool()
    with pytest.raises(CheckpointError, match="neither"):
        tool.main(["--smoke", "--out", str(tmp_path / "run"), "--resume", str(tmp_path)])
    assert not (tmp_path / "run").exists()


def test_export_without_record_or_with_other_weights_is_refused(tmp_path):
    trainer = Trainer(_smoke_config(tmp_path))
    export_module.export_pipeline(trainer.transformer, trainer.text_encoder, trainer.preset,
                                  tmp_path / "bare")
    with pytest.raises(CheckpointError, match="without training_state.json"):
        load_resume_source(tmp_path / "bare")
    export_module.export_pipeline(trainer.transformer, trainer.text_encoder, trainer.preset,
                                  tmp_path / "model", state=trainer.training_state(),
                                  loss_csv=trainer.loss_csv)
    assert load_resume_source(tmp_path / "model").state["step"] == 0
    with torch.no_grad():
        trainer.transformer.proj_out.weight.add_(1.0)
    export_module.export_pipeline(trainer.transformer, trainer.text_encoder, trainer.preset,
                                  tmp_path / "model")  # new weights, stale training record
    with pytest.raises(CheckpointError, match="sha256"):
        load_resume_source(tmp_path / "model")


def test_resume_from_export_refuses_another_preset(tmp_path):
    trainer = Trainer(_smoke_config(tmp_path))
    state = {**trainer.training_state(), "preset": "reference"}
    export_module.export_pipeline(trainer.transformer, trainer.text_encoder, trainer.preset,
                                  tmp_path / "model", state=state, loss_csv=trainer.loss_csv)
    with pytest.raises(ValueError, match="preset"):
        Trainer(_smoke_config(tmp_path)).load(load_resume_source(tmp_path / "model"))


def test_shipped_model_resumes_at_its_recorded_step():
    ckpt = load_resume_source(SHIPPED)  # also checks the weight files against the record
    assert ckpt.state["step"] == 7859 and ckpt.state["preset"] == "reference"
    assert ckpt.state["train_seconds"] == pytest.approx(1868.6, abs=0.05)
    last = list(csv.DictReader(ckpt.loss_csv.splitlines()))[-1]
    assert int(last["step"]) == ckpt.state["step"]
    assert float(last["train_seconds"]) == pytest.approx(ckpt.state["train_seconds"], abs=0.05)
    trainer = Trainer(TrainConfig(out=Path("."), preset="reference", device="cpu",
                                  compile=False))
    trainer.load(ckpt)
    assert trainer.step == 7859 and trainer.restarted_at == 7859  # an export has no AdamW state
    assert torch.equal(trainer.transformer.proj_out.weight.detach(),
                       ckpt.tensors["transformer.proj_out.weight"].float())


def test_stop_step_ends_training_at_that_global_step_over_runs(tmp_path, caplog):
    config = TrainConfig(out=tmp_path, preset="smoke", device="cpu", compile=False, batch_size=2,
                         stop_step=2, log_every=1, save_every=0, max_steps=5)
    Trainer(config).run()
    assert load_checkpoint(tmp_path / "checkpoint").state["step"] == 2  # not max_steps' 5
    resumed = Trainer(dataclasses.replace(config, resume=tmp_path / "checkpoint"))
    resumed.load(load_resume_source(tmp_path / "checkpoint"))
    with caplog.at_level(logging.INFO, logger="ditplan.reference.training"):
        resumed.run()
    assert resumed.step == 2  # a run that starts at the stop step trains nothing, and says so
    assert "step 2 is at --stop-at-step 2: nothing to train" in caplog.text


def test_weighted_mse_weights_only_the_sprites_pixels_and_shards_average_to_the_batch():
    gen = torch.Generator().manual_seed(0)
    pred, target = (torch.randn(4, 3, 2, 5, 5, generator=gen) for _ in range(2))  # [B, C, F, H, W]
    fg = torch.rand(4, 2, 5, 5, generator=gen) < 0.2  # [B, F, H, W]
    plain = torch.nn.functional.mse_loss(pred, target)
    assert torch.equal(weighted_mse(pred, target, fg, 1.0), plain)
    err = (pred - target).square()
    fg_part = (err * fg[:, None]).sum() / err.numel()
    assert fg_part > 0
    # weight 4: the sprites' share counts 3 more times; background pixels are unchanged
    torch.testing.assert_close(weighted_mse(pred, target, fg, 4.0), plain + 3 * fg_part)
    torch.testing.assert_close(weighted_mse(pred, target, torch.zeros_like(fg), 4.0), plain)
    halves = [weighted_mse(pred[i:i + 2], target[i:i + 2], fg[i:i + 2], 4.0) for i in (0, 2)]
    torch.testing.assert_close(sum(halves) / 2, weighted_mse(pred, target, fg, 4.0))


def test_foreground_weight_reaches_the_training_loss(tmp_path):
    losses = {}
    for weight in (1.0, 4.0):
        torch.manual_seed(0)
        trainer = Trainer(_smoke_config(tmp_path / str(weight), foreground_weight=weight))
        losses[weight] = trainer.train_step()[0].item()
    # the same batch, noise and initial weights: only the sprites' pixels count more
    assert losses[4.0] > losses[1.0] * 1.01
    with pytest.raises(SystemExit):
        _tool().parse_args(["--smoke", "--out", str(tmp_path / "x"), "--foreground-weight", "0"])
    assert _tool().parse_args(["--smoke", "--out", str(tmp_path / "y")]).foreground_weight == 1.0


def test_export_without_training_keeps_the_checkpoints_record(tmp_path):
    """Exporting a lean checkpoint (the long model's device-call loop) must not record the
    export command's config, nor the optimizer restart its loading implies."""
    Trainer(_smoke_config(tmp_path, lean_checkpoint=True, max_steps=2)).run()
    saved = load_checkpoint(tmp_path / "checkpoint").state
    export = tmp_path / "export"
    Trainer(_smoke_config(tmp_path, resume=tmp_path / "checkpoint", max_steps=0,
                          export=export)).run()
    record = json.loads((export / "training_state.json").read_text())
    assert saved["config"]["max_steps"] == 2 and saved["optimizer_restarted_at"] is None
    for key in ("step", "config", "optimizer_restarted_at", "train_seconds"):
        assert record[key] == saved[key], key


def test_resume_warns_of_a_changed_recipe_unless_it_only_exports(tmp_path, caplog):
    Trainer(_smoke_config(tmp_path, lean_checkpoint=True, max_steps=1)).run()
    checkpoint = load_checkpoint(tmp_path / "checkpoint")
    caplog.set_level(logging.WARNING, logger="ditplan.reference.training")
    Trainer(_smoke_config(tmp_path, foreground_weight=4.0, max_steps=1)).load(checkpoint)
    assert "foreground_weight changed on resume: 1.0 -> 4.0" in caplog.text
    caplog.clear()
    Trainer(_smoke_config(tmp_path, foreground_weight=4.0, max_steps=0)).load(checkpoint)
    assert "changed on resume" not in caplog.text


def test_a_loss_curve_from_before_the_mass_column_resumes_in_the_current_columns(tmp_path):
    Trainer(_smoke_config(tmp_path, max_steps=1)).run()
    curve = tmp_path / "checkpoint" / "loss.csv"
    current = curve.read_text()
    assert current.splitlines()[0].endswith(",top_block_mass")
    old = "".join(line.rsplit(",", 1)[0] + "\n" for line in current.splitlines())
    curve.write_text(old)  # as written before the column: six fields a row
    assert training.with_mass_column(old) == current  # the penalty was off: an empty cell
    assert training.with_mass_column(current) == current
    Trainer(_smoke_config(tmp_path, max_steps=1, resume=tmp_path / "checkpoint")).run()
    rows = _rows(tmp_path)
    assert [r["step"] for r in rows] == ["1", "2"]
    assert [r["top_block_mass"] for r in rows] == ["", ""]


def test_pipeline_preset_name_checks_the_folder_then_names_its_preset(tmp_path):
    with pytest.raises(CheckpointError, match="not a pipeline folder"):
        export_module.pipeline_preset_name(tmp_path)
    (tmp_path / "model_index.json").write_text("{}")
    assert export_module.pipeline_preset_name(tmp_path) == "reference"  # no training record
    (tmp_path / "training_state.json").write_text(json.dumps({"preset": "long"}))
    assert export_module.pipeline_preset_name(tmp_path) == "long"
    assert export_module.pipeline_preset_name(tmp_path, "smoke") == "smoke"
    (tmp_path / "training_state.json").write_text(json.dumps({"preset": "nope"}))
    with pytest.raises(CheckpointError, match="names no known preset"):
        export_module.pipeline_preset_name(tmp_path)
