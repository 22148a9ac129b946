"""Reference captions parse back to their sprites; teacher forcing follows the noising path."""

from __future__ import annotations

import pytest
import torch

from ditplan.profiler.clip_inputs import (
    CaptionParseError,
    TeacherForcing,
    parse_reference_caption,
    reference_clip,
)
from ditplan.reference.attributes import captions_for, sample_attributes
from ditplan.reference.clips import ClipSpec


def test_captions_round_trip_through_the_parser():
    attributes = sample_attributes(40, torch.Generator().manual_seed(0), max_sprites=3)
    for caption in captions_for(attributes):
        parsed = parse_reference_caption(caption)
        assert captions_for(parsed) == [caption]


def test_spacing_and_case_are_tolerated():
    parsed = parse_reference_caption("A red circle slowly moves left ,  a blue square "
                                     "quickly moves up and a green diamond slowly moves down")
    assert parsed.colour.shape == (1, 3)


@pytest.mark.parametrize("caption", ["a cat walking on grass", "a red circle moves left", ""])
def test_non_reference_captions_are_refused(caption):
    with pytest.raises(CaptionParseError, match="not a reference caption"):
        parse_reference_caption(caption)


def test_too_many_sprites_are_refused():
    clause = "a red circle slowly moves left"
    with pytest.raises(CaptionParseError, match="at most 3"):
        parse_reference_caption(", ".join([clause] * 3) + " and " + clause)


def test_reference_clip_matches_its_caption():
    spec = ClipSpec(frames=4, height=16, width=16)
    clip = reference_clip("a red circle slowly moves right", seed=5, spec=spec, device="cpu")
    assert clip.video.shape == (1, 3, 4, 16, 16) and clip.fg_mask.shape == (1, 4, 16, 16)
    assert clip.captions == ["a red circle slowly moves right"]
    assert clip.fg_mask.any()
    again = reference_clip("a red circle slowly moves right", seed=5, spec=spec, device="cpu")
    assert torch.equal(clip.video, again.video)


def test_teacher_forcing_interpolates_clip_and_noise():
    x0 = torch.randn(1, 3, 2, 4, 4)
    sigmas = torch.tensor([1.0, 0.6, 0.0])
    forcing = TeacherForcing(x0, seed=3, sigmas=sigmas)
    assert torch.equal(forcing.latents_at(0), forcing.noise)
    assert torch.equal(forcing.latents_at(2), x0)
    torch.testing.assert_close(forcing.latents_at(1), 0.4 * x0 + 0.6 * forcing.noise)
    replaced = forcing.callback()(None, 0, None, {"latents": torch.zeros(1)})
    torch.testing.assert_close(replaced["latents"], forcing.latents_at(1))


def test_clip_mode_draws_the_models_own_training_clips(monkeypatch, tmp_path):
    """The long model's clips (its speeds and textured backgrounds), not the reference's."""
    from dataclasses import replace
    from pathlib import Path

    from ditplan.profiler import run as profiler_run
    from ditplan.profiler.config import ProfileConfig
    from ditplan.reference.config import LONG
    from ditplan.runtime.loading import load_pipeline

    long_model = Path(__file__).resolve().parents[2] / "artifacts/models/ditplan-ref-t2v-long"
    drawn = []

    def recording(caption, seed, spec, device):
        drawn.append(spec)
        return reference_clip(caption, seed, spec, device)

    monkeypatch.setattr(profiler_run.clip_inputs, "reference_clip", recording)
    pipe = load_pipeline(str(long_model), device="cpu")
    config = ProfileConfig(out=tmp_path, model=str(long_model), frames=4, height=16, width=16,
                           steps=2)
    call = {}
    profiler_run._clip_inputs(pipe, config, "a red circle slowly moves left", 0, call)
    assert drawn == [replace(LONG.clip, frames=4, height=16, width=16)]
    assert call["latents"].shape == (1, 3, 4, 16, 16)  # [B, C, F, H, W]


def test_long_model_at_the_default_size_gets_a_warning(caplog, tmp_path):
    import logging
    from pathlib import Path

    from ditplan.profiler.config import ProfileConfig
    from ditplan.profiler.run import _warn_off_workload
    from ditplan.runtime.loading import load_pipeline

    models = Path(__file__).resolve().parents[2] / "artifacts/models"
    long_pipe = load_pipeline(str(models / "ditplan-ref-t2v-long"), device="cpu")
    small_pipe = load_pipeline(str(models / "ditplan-ref-t2v"), device="cpu")
    with caplog.at_level(logging.WARNING, logger="ditplan.profiler.run"):
        _warn_off_workload(small_pipe, ProfileConfig(out=tmp_path, frames=16))  # its own size
        _warn_off_workload(long_pipe, ProfileConfig(out=tmp_path, frames=8, height=32, width=32))
        assert not caplog.records  # a size asked for on purpose is not second-guessed
        _warn_off_workload(long_pipe, ProfileConfig(out=tmp_path, frames=16))
    assert "trained at 32 x 64 x 64 (pass --frames 32 --height 64 --width 64" in caplog.text
