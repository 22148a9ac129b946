"""Fine-tuning another preset: curriculum over clip size, initialising from an export, lean
checkpoints, and the --long recipe run again and again as device calls would."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from ditplan.reference import config as config_module
from ditplan.reference.checkpoint import load_checkpoint
from ditplan.reference.config import LONG, SMOKE
from ditplan.reference.curriculum import (
    CurriculumError,
    Stage,
    check_patch,
    clip_spec_at,
    parse_curriculum,
)
from ditplan.reference.pipeline import ReferenceVideoPipeline
from ditplan.reference.training import (
    MOMENT_PREFIX,
    TrainConfig,
    Trainer,
    load_resume_source,
)
from tests.tool_scripts import load_tool

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = ROOT / "artifacts" / "models" / "ditplan-ref-t2v"


def _config(out: Path, **changes) -> TrainConfig:
    fields = dict(out=out, preset="smoke", device="cpu", compile=False, batch_size=2,
                  max_steps=2, log_every=1, save_every=0, warmup_steps=1, total_steps=20)
    return TrainConfig(**{**fields, **changes})


@pytest.fixture
def smoke_long(monkeypatch):
    """A second tiny preset with the smoke architecture and the long preset's clip style."""
    preset = replace(SMOKE, name="smoke-long",
                     clip=replace(LONG.clip, frames=4, height=16, width=16))
    monkeypatch.setitem(config_module.PRESETS, preset.name, preset)
    return preset


@pytest.fixture
def smoke_export(tmp_path) -> Path:
    Trainer(_config(tmp_path / "source", export=tmp_path / "source" / "export")).run()
    return tmp_path / "source" / "export"


def test_parse_curriculum_stages_and_errors():
    assert parse_curriculum(None) == parse_curriculum("") == ()
    assert parse_curriculum("8x48x48:100, 16x64x64:800") == (
        Stage(8, 48, 48, 100), Stage(16, 64, 64, 800))
    for bad in ("16x64:800", "16x64x64", "1x64x64:5", "16x64x64:0", "8x8x8:9,8x8x8:9"):
        with pytest.raises(CurriculumError):
            parse_curriculum(bad)
    check_patch(parse_curriculum("3x16x16:5"), (1, 2, 2))
    with pytest.raises(CurriculumError, match="patch"):
        check_patch(parse_curriculum("4x15x16:5"), (1, 2, 2))


def test_clip_spec_at_changes_only_the_geometry():
    stages = parse_curriculum("16x64x64:800")
    early = clip_spec_at(LONG.clip, stages, 799)
    assert (early.frames, early.height, early.width) == (16, 64, 64)
    assert early == replace(LONG.clip, frames=16)  # speeds, sizes, backgrounds: the preset's
    assert clip_spec_at(LONG.clip, stages, 800) is LONG.clip


def test_curriculum_switches_clip_size_and_survives_a_resume(tmp_path):
    config = _config(tmp_path, curriculum="2x8x8:2")
    first = Trainer(config)
    assert first._batch(0)[0].shape == (2, 3, 2, 8, 8)  # [B, 3, F, H, W]
    assert first._batch(2)[0].shape == (2, 3, 4, 16, 16)  # the smoke preset's clips
    first.run()
    resumed = Trainer(_config(tmp_path, curriculum="2x8x8:2", max_steps=1,
                              resume=tmp_path / "checkpoint"))
    resumed.run()
    assert resumed.step == 3
    assert resumed.spec_at(resumed.step - 1).frames == 4
    with pytest.raises(CurriculumError):
        Trainer(_config(tmp_path, curriculum="2x9x8:2"))  # not a multiple of the patch


def test_initialise_from_another_presets_export_starts_a_new_run(tmp_path, smoke_long,
                                                                 smoke_export):
    trainer = Trainer(_config(tmp_path / "long", preset=smoke_long.name))
    trainer.initialise(load_resume_source(smoke_export), smoke_export)
    source = load_resume_source(smoke_export)
    assert trainer.step == 0 and trainer.restarted_at is None
    for name, p in trainer.named_params:
        assert torch.equal(p.detach(), source.tensors[name].float()), name
    assert trainer.initialised_from == {"source": str(smoke_export), "preset": "smoke",
                                        "step": 2}
    with pytest.raises(ValueError, match="preset"):  # resuming still insists on the preset
        Trainer(_config(tmp_path / "other", preset=smoke_long.name)).load(source)


def test_lean_checkpoint_holds_weights_only_and_resumes_with_a_restart(tmp_path, smoke_long,
                                                                       smoke_export):
    config = _config(tmp_path, preset=smoke_long.name, init=smoke_export, lean_checkpoint=True)
    Trainer(config).run()
    saved = load_checkpoint(tmp_path / "checkpoint")
    assert not any(name.startswith(MOMENT_PREFIX) for name in saved.tensors)
    assert saved.state["step"] == 2 and saved.state["initialised_from"]["preset"] == "smoke"
    resumed = Trainer(replace(config, resume=tmp_path / "checkpoint"))
    resumed.run()
    assert resumed.step == 4 and resumed.restarted_at == 2  # AdamW restarted at the resume
    again = load_checkpoint(tmp_path / "checkpoint").state
    assert again["initialised_from"] == saved.state["initialised_from"]  # provenance stays
    assert [int(r.split(",")[0]) for r in resumed.loss_csv.splitlines()[1:]] == [1, 2, 3, 4]


def test_long_recipe_defaults_and_explicit_flags_win(tmp_path):
    tool = load_tool("train_reference")
    args = tool.parse_args(["--long", "--out", str(tmp_path)])
    assert args.preset == "long" and args.init == SHIPPED and args.lean_checkpoint
    assert args.curriculum == "16x64x64:800" and args.batch_size == 16
    assert args.stop_step == args.total_steps == 2000  # running it again past 2,000: no steps
    assert args.resume is None  # no checkpoint yet: start from --init
    (tmp_path / "checkpoint").mkdir()
    args = tool.parse_args(["--long", "--out", str(tmp_path), "--batch-size", "8"])
    assert args.resume == tmp_path / "checkpoint" and args.batch_size == 8
    with pytest.raises(SystemExit):
        tool.parse_args(["--long", "--smoke", "--out", str(tmp_path / "x")])
    with pytest.raises(SystemExit):
        tool.parse_args(["--long", "--out", str(tmp_path), "--stop-at-step", "0"])


def test_long_recipe_command_runs_again_and_again(tmp_path, smoke_export):
    """The device-call loop at smoke size: the same command line each time; the first call
    starts from --init, later ones continue <out>/checkpoint; the export is resumable."""
    tool = load_tool("train_reference")
    command = ["--long", "--out", str(tmp_path / "run"), "--preset", "smoke",
               "--init", str(smoke_export), "--curriculum", "2x16x16:3", "--device", "cpu",
               "--no-compile", "--batch-size", "2", "--max-steps", "2", "--log-every", "1",
               "--warmup-steps", "1", "--rewarm-steps", "1"]
    for call in range(1, 3):
        assert tool.main(command) == 0
        state = json.loads((tmp_path / "run" / "checkpoint" / "state.json").read_text())
        assert state["step"] == 2 * call
    assert state["optimizer_restarted_at"] == 2 and state["initialised_from"]["step"] == 2
    assert tool.main([*command, "--max-steps", "0", "--export", str(tmp_path / "export")]) == 0
    record = json.loads((tmp_path / "export" / "training_state.json").read_text())
    assert record["step"] == 4 and record["initialised_from"]["source"] == str(smoke_export)
    pipe = ReferenceVideoPipeline.from_pretrained(tmp_path / "export")
    assert pipe.transformer.config.num_layers == SMOKE.transformer["num_layers"]


def test_long_preset_initialises_from_the_shipped_model():
    trainer = Trainer(TrainConfig(out=Path("."), preset="long", device="cpu", compile=False))
    trainer.initialise(load_resume_source(SHIPPED), SHIPPED)
    assert trainer.initialised_from["step"] == 7859
    assert trainer.initialised_from["preset"] == "reference"
    assert trainer.spec_at(0) == LONG.clip


def test_eval_tool_takes_the_preset_from_the_training_record(tmp_path, smoke_export):
    tool = load_tool("eval_reference")
    assert tool.parse_args(["--model", str(SHIPPED), "--out", str(tmp_path)]).preset == \
        "reference"
    assert tool.parse_args(["--model", str(smoke_export), "--out", str(tmp_path)]).preset == \
        "smoke"
    args = tool.parse_args(["--model", str(smoke_export), "--out", str(tmp_path), "--preset",
                            "long", "--frames", "8"])
    assert (args.preset, args.frames, args.height) == ("long", 8, None)
