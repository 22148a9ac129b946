"""The long-sequence preset: same model, 32 x 64 x 64 clips with scaled sprites, textured
backgrounds, and a scorer that holds at that size."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from ditplan.reference.attributes import heldout_attributes
from ditplan.reference.backgrounds import (
    BACKGROUND_MAX,
    BACKGROUND_MIN,
    BackgroundStyle,
    render_backgrounds,
)
from ditplan.reference.clips import generate_clips, render_clips
from ditplan.reference.config import LONG, REFERENCE
from ditplan.reference.evaluation import eval_clip
from ditplan.reference.scoring import min_pixels, score_clips, summarize, to_frames

ROOT = Path(__file__).resolve().parents[2]

SINGLE = replace(LONG.clip, max_sprites=1, min_sprites=1, bounce_prob=0.0)


def test_long_preset_is_the_reference_model_at_32768_tokens():
    assert LONG.transformer == REFERENCE.transformer
    assert LONG.caption_encoder == REFERENCE.caption_encoder
    assert LONG.sigma_shift == REFERENCE.sigma_shift
    assert (LONG.clip.frames, LONG.clip.height, LONG.clip.width) == (32, 64, 64)
    assert LONG.video_tokens() == 32 * 32 * 32 >= 30_000


def test_sprites_scale_with_the_frame_and_cross_it_in_the_clip():
    clips = generate_clips(32, 4, spec=SINGLE)
    assert clips.video.shape == (32, 3, 32, 64, 64)
    scale = 64 / 48
    assert clips.radius.min() >= 4.0 * scale and clips.radius.max() <= 5.0 * scale
    steps = (clips.centers[:, 0, 1:] - clips.centers[:, 0, :-1]).abs().amax(-1)  # [B, F-1]
    assert steps.min() >= 0.75 * scale - 1e-4 and steps.max() <= 1.2 * scale + 1e-4
    assert not clips.bounced.any()  # even the fastest, largest sprite fits without a bounce
    travel = (clips.centers[:, 0, -1] - clips.centers[:, 0, 0]).abs().amax(-1)
    assert travel.min() >= 0.45 * 64  # every sprite crosses about half the frame or more
    # the scorer's temporal-median background is exact only if no pixel is covered in half
    # the frames
    assert clips.fg_mask.sum(dim=1).max() < 16


def test_long_backgrounds_are_static_in_range_and_more_textured():
    clips = generate_clips(8, 1, spec=LONG.clip)
    rgb = (clips.video + 1) / 2
    never = ~clips.fg_mask.any(dim=1)  # [B, H, W] pixels no sprite ever covers
    for b in range(8):
        background = rgb[b][:, :, never[b]]  # [3, F, P]
        assert torch.equal(background, background[:, :1].expand_as(background))

    def token_contrast(style: BackgroundStyle) -> float:
        backgrounds = render_backgrounds(256, 64, 64, torch.Generator().manual_seed(0), style)
        tokens = torch.nn.functional.avg_pool2d(backgrounds, 2)  # one colour per 2 x 2 patch
        return (tokens[..., 1:] - tokens[..., :-1]).abs().amax(1).mean().item()

    long = render_backgrounds(64, 64, 64, torch.Generator().manual_seed(0), LONG.clip.background)
    assert long.min() >= BACKGROUND_MIN and long.max() <= BACKGROUND_MAX
    # measured 0.023 vs 0.0095: neighbouring tokens differ about 2.4x as much
    assert token_contrast(LONG.clip.background) > 2 * token_contrast(BackgroundStyle())


def test_grain_is_drawn_after_the_reference_stream():
    # Same seed with and without grain: the rest of the background is drawn identically, so the
    # difference is the grain alone, one value for all channels (where nothing was clamped).
    plain = render_backgrounds(16, 32, 32, torch.Generator().manual_seed(3), BackgroundStyle())
    grainy = render_backgrounds(16, 32, 32, torch.Generator().manual_seed(3),
                                BackgroundStyle(grain_amplitude=0.03))
    inside = [(x > BACKGROUND_MIN) & (x < BACKGROUND_MAX) for x in (plain, grainy)]
    unclamped = (inside[0] & inside[1]).all(dim=1)  # [B, H, W]
    grain = (grainy - plain).permute(0, 2, 3, 1)[unclamped]  # [P, 3]
    assert torch.allclose(grain, grain[:, :1].expand_as(grain), atol=1e-6)
    assert 0.01 < grain.abs().max() <= 0.03 + 1e-6


def test_min_pixels_scales_with_frame_area_above_48():
    assert min_pixels(48, 48) == 6 and min_pixels(16, 16) == 6 and min_pixels(32, 48) == 6
    assert min_pixels(64, 64) == 11 and min_pixels(96, 96) == 24


def test_data_clips_of_the_long_workload_score_high():
    attrs = heldout_attributes()
    attrs = type(attrs)(**{k: v[::8] for k, v in vars(attrs).items()})  # 8 captions, all shapes
    clips = render_clips(attrs, torch.Generator().manual_seed(0), eval_clip(LONG.clip))
    summary = summarize(score_clips(to_frames(clips.video), attrs))
    assert summary["caption_and_count_accuracy"] == 1.0  # all 64: 1.0 (measured)
    assert summary["direction_cos_mean"] > 0.99
    assert 1.0 <= summary["speed_px_median"] <= 1.6 * 2**0.5  # px/frame at 64 px
    assert summary["background_std_mean"] < 1e-6


def test_trained_preset_reads_the_exports_record(tmp_path):
    from types import SimpleNamespace

    from ditplan.reference.checkpoint import CheckpointError
    from ditplan.reference.export import trained_preset

    def pipe_from(folder):
        return SimpleNamespace(config=SimpleNamespace(_name_or_path=str(folder)))

    long_folder = ROOT / "artifacts" / "models" / "ditplan-ref-t2v-long"
    assert trained_preset(pipe_from(long_folder)) is LONG  # the shipped long model says so
    assert trained_preset(pipe_from(tmp_path)) is REFERENCE  # no record: the reference preset
    assert trained_preset(SimpleNamespace(config=SimpleNamespace())) is REFERENCE  # in memory
    (tmp_path / "training_state.json").write_text('{"preset": "huge"}')
    with pytest.raises(CheckpointError, match="names no known preset"):
        trained_preset(pipe_from(tmp_path))
