"""`ditplan profile` flags: parsing, clear errors with exit codes, an end-to-end CLI run."""

from __future__ import annotations

import argparse
import re

import pytest

from ditplan.profiler import commands, run

SMALL = ["--steps", "2", "--frames", "4", "--height", "16", "--width", "16", "--block-size",
         "64", "--tile", "1x4x4", "--device", "cpu", "--no-progress",
         "--prompts", "a red circle slowly moves right"]


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="ditplan")
    commands.register(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(["profile", *argv])


@pytest.fixture
def cli(monkeypatch, reference_pipe):
    """Runs the handler with load_pipeline returning the tiny reference pipeline."""
    loaded = []
    monkeypatch.setattr(run, "load_pipeline",
                        lambda model, **kw: loaded.append((model, kw)) or reference_pipe)

    def invoke(argv):
        args = parse(argv)
        return args.handler(args), loaded

    return invoke


@pytest.mark.parametrize("text, tile", [("1x8x8", (1, 8, 8)), ("2,4,4", (2, 4, 4)),
                                        (" 1X2X3 ", (1, 2, 3))])
def test_parse_tile(text, tile):
    assert commands.parse_tile(text) == tile


@pytest.mark.parametrize("text", ["8x8", "1x0x8", "axbxc", "1x8x8x1", ""])
def test_bad_tile_is_refused(text):
    with pytest.raises(ValueError, match="TxHxW"):
        commands.parse_tile(text)


def test_prompts_from_a_file_and_text(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("a red circle slowly moves left\n\n  a blue square quickly moves up  \n")
    assert commands.read_prompts([str(path), "a green diamond slowly moves down"]) == (
        "a red circle slowly moves left", "a blue square quickly moves up",
        "a green diamond slowly moves down")
    (tmp_path / "empty.txt").write_text("\n")
    with pytest.raises(ValueError, match="no prompts"):
        commands.read_prompts([str(tmp_path / "empty.txt")])


def test_defaults_profile_the_reference_model(tmp_path):
    config = commands.config_from_args(parse(["--out", str(tmp_path)]))
    assert config.model == "reference" and config.mode == "auto"
    assert config.block_size == 128 and config.tile == (1, 8, 8)
    assert config.recorder_settings().map_steps == (0, 16, 31)


@pytest.mark.parametrize("flags, tile, sink", [
    ([], "1x8x8", True), ([], "8x4x4", False),  # auto: only a tile one frame deep
    (["--sink", "on"], "8x4x4", True), (["--sink", "off"], "1x8x8", False),
    (["--no-sink"], "1x8x8", False), (["--sink", "auto"], "2x8x8", False),
])
def test_sink_flag_defaults_to_one_frame_deep_tiles(tmp_path, flags, tile, sink):
    config = commands.config_from_args(parse(["--out", str(tmp_path), "--tile", tile, *flags]))
    assert config.recorder_settings().sink is sink
    assert config.recorder_settings().to_metadata()["sink"] is sink  # what the traces record


def test_attention_steps_flag_limits_statistics_and_default_maps(tmp_path):
    config = commands.config_from_args(parse(["--out", str(tmp_path), "--steps", "50",
                                              "--attention-steps", "49", "0", "25"]))
    settings = config.recorder_settings()
    assert settings.attention_steps == (0, 25, 49)
    assert settings.map_steps == (0, 25, 49)  # first, middle, last of the attention steps
    assert config.identity()["attention_steps"] == [0, 25, 49]  # order-free: same run


def test_output_error_is_opt_in_and_part_of_the_run(tmp_path):
    plain = commands.config_from_args(parse(["--out", str(tmp_path)]))
    measured = commands.config_from_args(parse(["--out", str(tmp_path), "--output-error"]))
    assert not plain.recorder_settings().output_error
    assert measured.recorder_settings().output_error
    assert plain.identity() != measured.identity()  # a resume with the other setting is refused


@pytest.mark.parametrize("flags, message", [
    (["--steps", "0"], "steps must be a positive int"),
    (["--tile", "8x8"], "TxHxW"),
    (["--map-steps", "5"], r"map steps \[5\] are outside 0..1"),
    (["--guidance-scale", "-1"], "guidance scale"),
    (["--seeds", "1", "1"], "seeds repeat"),
    (["--attn-threshold", "0"], "threshold"),
    (["--attention-steps", "7"], r"attention steps \[7\] are outside 0..1"),
])
def test_bad_flags_exit_2_with_a_message(cli, tmp_path, capsys, flags, message):
    code, loaded = cli(["--out", str(tmp_path), *SMALL, *flags])
    assert code == 2 and not loaded
    err = capsys.readouterr().err
    assert re.search(message, err), err


def test_argparse_rejects_unsupported_block_size(tmp_path):
    with pytest.raises(SystemExit) as exc:
        parse(["--out", str(tmp_path), "--block-size", "32"])
    assert exc.value.code == 2


def test_cli_end_to_end_then_resume_then_mismatch(cli, tmp_path, capsys):
    code, loaded = cli(["--out", str(tmp_path), *SMALL, "--map-steps", "1"])
    assert code == 0, capsys.readouterr().err
    assert loaded[0][0] == "reference" and loaded[0][1]["device"] == "cpu"
    assert "wrote 5 trace files" in capsys.readouterr().out
    assert (tmp_path / "report.png").is_file()
    assert cli(["--out", str(tmp_path), *SMALL, "--map-steps", "1"])[0] == 0  # resumes: no-op
    code, _ = cli(["--out", str(tmp_path), *SMALL])  # map steps differ now
    assert code == 1
    assert "other arguments" in capsys.readouterr().err


def test_cli_refuses_a_non_reference_caption_in_clip_mode(cli, tmp_path, capsys):
    code, _ = cli(["--out", str(tmp_path), *SMALL, "--mode", "clip",
                   "--prompts", "a cat walking on grass"])
    assert code == 1
    assert "not a reference caption" in capsys.readouterr().err
