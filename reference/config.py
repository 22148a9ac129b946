"""Model presets of the reference video DiT: the shipped configuration, its long-sequence variant
and a tiny CPU smoke one."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from diffusers import FlowMatchEulerDiscreteScheduler, WanTransformer3DModel

from ditplan.reference.attributes import caption_vocabulary
from ditplan.reference.backgrounds import BackgroundStyle
from ditplan.reference.captions import CaptionEncoder
from ditplan.reference.clips import ClipSpec

MODEL_NAME = "ditplan-ref-t2v"


@dataclass(frozen=True)
class ModelPreset:
    """Everything that defines a reference model's architecture and its training clips."""

    name: str
    transformer: dict
    caption_encoder: dict
    clip: ClipSpec = field(default_factory=ClipSpec)
    # Sigma shift of both the sampler and the training sigma distribution: more steps/samples at
    # high noise, where the sprite's trajectory (the hard part) is decided.
    sigma_shift: float = 2.0

    def token_grid(self, frames: int, height: int, width: int) -> tuple[int, int, int]:
        """(F, H, W) video tokens of a clip of frames x height x width px after the patch."""
        pt, ph, pw = self.transformer["patch_size"]
        return frames // pt, height // ph, width // pw

    def video_tokens(self) -> int:
        """Video tokens per sample at the preset's clip size."""
        return math.prod(self.token_grid(self.clip.frames, self.clip.height, self.clip.width))


REFERENCE = ModelPreset(
    name="reference",
    # 9.0M parameters; 16 x 48 x 48 px with patch (1, 2, 2) is 16 x 24 x 24 = 9,216 tokens.
    transformer=dict(
        patch_size=(1, 2, 2),
        num_attention_heads=4,
        attention_head_dim=64,
        in_channels=3,
        out_channels=3,
        text_dim=64,
        freq_dim=128,
        ffn_dim=1024,
        num_layers=8,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
    ),
    caption_encoder=dict(max_length=32, hidden_dim=128, text_dim=64, num_layers=2, num_heads=4),
)

# The same model at 32 frames x 64 x 64 px = 32 x 32 x 32 = 32,768 video tokens (Wan2.1-1.3B at
# 480p x 81 frames has 32,760), fine-tuned from the shipped weights. Sprite sizes scale with the
# frame (radius 5.3-6.7 px). Speeds are half the reference's in 48-pixel units, so a sprite crosses
# the same share of the frame in twice the frames: 1.0-1.2 (slow) and 1.4-1.6 (fast) px/frame per
# axis; the fastest travels 31 x 1.6 = 49.6 px of the 50.7 px the largest sprite's centre can span,
# and a sprite covers a pixel in at most 2 x 6.7 / 1.0 + 1 < 16 of 32 frames (the scorer's median
# background stays exact). Backgrounds carry more structure: a finer colour field, stronger and
# finer stripes/checkers, and a static grain on every background that only the same place in other
# frames predicts, so attention has local structure to find.
LONG = replace(
    REFERENCE,
    name="long",
    clip=ClipSpec(
        frames=32, height=64, width=64, slow_speed=(0.75, 0.9), fast_speed=(1.05, 1.2),
        background=BackgroundStyle(field_cells=5, texture_amplitude=0.08, texture_cycles=(4, 11),
                                   grain_amplitude=0.03, grain_cells=16)),
)

SMOKE = ModelPreset(
    name="smoke",
    transformer=dict(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=16,
        in_channels=3,
        out_channels=3,
        text_dim=16,
        freq_dim=32,
        ffn_dim=64,
        num_layers=2,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=64,
    ),
    caption_encoder=dict(max_length=32, hidden_dim=32, text_dim=16, num_layers=1, num_heads=2),
    clip=ClipSpec(frames=4, height=16, width=16),
)

PRESETS = {p.name: p for p in (REFERENCE, LONG, SMOKE)}


def get_preset(name: str) -> ModelPreset:
    """Returns the preset called `name` ("reference", "long" or "smoke")."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name]


def build_transformer(preset: ModelPreset) -> WanTransformer3DModel:
    """A freshly initialised WanTransformer3DModel for the preset (fp32, train mode)."""
    return WanTransformer3DModel(**preset.transformer)


def build_caption_encoder(preset: ModelPreset) -> CaptionEncoder:
    """A freshly initialised CaptionEncoder carrying the caption vocabulary in its config."""
    return CaptionEncoder(vocabulary=caption_vocabulary(), **preset.caption_encoder)


def build_scheduler(preset: ModelPreset) -> FlowMatchEulerDiscreteScheduler:
    """The rectified-flow Euler sampler with the preset's sigma shift."""
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=preset.sigma_shift)
