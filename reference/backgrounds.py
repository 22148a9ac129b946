"""Static, desaturated clip backgrounds: colour fields, gradients, textures, optional grain."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

# Backgrounds stay inside this range in every channel, so every palette colour (which has a
# channel >= 0.9) differs from them by >= 0.18 somewhere; see attributes.COLOURS.
BACKGROUND_MIN = 0.15
BACKGROUND_MAX = 0.72
KINDS = ("field", "gradient", "texture")


@dataclass(frozen=True)
class BackgroundStyle:
    """How much structure backgrounds have. Lengths are counted across the frame, so a style looks
    the same at every frame size. The defaults are the reference model's data.

    field_cells: the colour field is field_cells x field_cells random colours, bilinearly
        upsampled (the field kind and the texture kind's base).
    texture_amplitude: amplitude of the texture kind's stripes or checker.
    texture_cycles: its periods across the frame, drawn from [low, high).
    grain_amplitude: a static monochrome value noise (grain_cells x grain_cells random values,
        bilinearly upsampled) added to every kind; 0 draws none. Fine detail that only the same
        place in other frames predicts.
    """

    field_cells: int = 3
    texture_amplitude: float = 0.05
    texture_cycles: tuple[int, int] = (3, 7)
    grain_amplitude: float = 0.0
    grain_cells: int = 16


def _uniform(shape, low, high, generator) -> torch.Tensor:
    return low + (high - low) * torch.rand(shape, generator=generator, device=generator.device)


def _base_colour(batch: int, generator: torch.Generator) -> torch.Tensor:
    grey = _uniform((batch, 1), 0.30, 0.55, generator)
    tint = _uniform((batch, 3), -0.07, 0.07, generator)
    return grey + tint  # [B, 3]


def _colour_field(base, height, width, amplitude, cells, generator) -> torch.Tensor:
    batch = base.shape[0]
    offsets = _uniform((batch, 3, cells, cells), -amplitude, amplitude, generator)
    coarse = base[:, :, None, None] + offsets  # [B, 3, cells, cells]
    return F.interpolate(coarse, size=(height, width), mode="bilinear", align_corners=True)


def _coordinates(batch, height, width, generator):
    ys = (torch.arange(height, device=generator.device) + 0.5) / height
    xs = (torch.arange(width, device=generator.device) + 0.5) / width
    angle = _uniform((batch, 1, 1), 0.0, 2 * math.pi, generator)
    # proj: [B, H, W], position along a random direction
    proj = xs[None, None, :] * torch.cos(angle) + ys[None, :, None] * torch.sin(angle)
    return proj, ys, xs


def _gradient(base, height, width, generator) -> torch.Tensor:
    batch = base.shape[0]
    proj, _, _ = _coordinates(batch, height, width, generator)
    lo, hi = proj.amin(dim=(1, 2), keepdim=True), proj.amax(dim=(1, 2), keepdim=True)
    s = ((proj - lo) / (hi - lo).clamp_min(1e-6)).unsqueeze(1)  # [B, 1, H, W] in [0, 1]
    delta = _uniform((batch, 3), -0.15, 0.15, generator)[:, :, None, None]
    return base[:, :, None, None] - delta + 2 * delta * s


def _texture(base, height, width, style, generator) -> torch.Tensor:
    batch = base.shape[0]
    field = _colour_field(base, height, width, 0.06, style.field_cells, generator)
    proj, ys, xs = _coordinates(batch, height, width, generator)
    cycles = torch.randint(*style.texture_cycles, (batch, 1, 1), generator=generator,
                           device=generator.device)
    phase = _uniform((batch, 1, 1), 0.0, 2 * math.pi, generator)
    stripes = torch.sin(2 * math.pi * cycles * proj + phase)
    checker = torch.sin(2 * math.pi * cycles * xs[None, None, :] + phase) * torch.sin(
        2 * math.pi * cycles * ys[None, :, None]
    )
    use_checker = torch.rand((batch, 1, 1), generator=generator, device=generator.device) < 0.5
    pattern = torch.where(use_checker, checker, stripes).unsqueeze(1)  # [B, 1, H, W]
    return field + style.texture_amplitude * pattern


def _grain(batch, height, width, style, generator) -> torch.Tensor:
    cells = _uniform((batch, 1, style.grain_cells, style.grain_cells), -1.0, 1.0, generator)
    fine = F.interpolate(cells, size=(height, width), mode="bilinear", align_corners=True)
    return style.grain_amplitude * fine  # [B, 1, H, W], the same in every channel


def render_backgrounds(
    batch: int,
    height: int,
    width: int,
    generator: torch.Generator,
    style: BackgroundStyle = BackgroundStyle(),
) -> torch.Tensor:
    """Draws one static background per clip: a colour field, a gradient or a texture (stripes or
    checker over a colour field), plus the style's grain if it has one.

    Args:
        batch: number of backgrounds B.
        height, width: size in pixels.
        generator: the only source of randomness; its device is where the result lives.
        style: texture parameters; the default draws exactly the reference model's backgrounds.

    Returns:
        float [B, 3, H, W] RGB in [BACKGROUND_MIN, BACKGROUND_MAX].
    """
    base = _base_colour(batch, generator)
    candidates = torch.stack(
        [
            _colour_field(base, height, width, 0.12, style.field_cells, generator),
            _gradient(base, height, width, generator),
            _texture(base, height, width, style, generator),
        ]
    )  # [kinds, B, 3, H, W]
    kind = torch.randint(0, len(KINDS), (batch,), generator=generator, device=generator.device)
    chosen = candidates[kind, torch.arange(batch, device=generator.device)]
    if style.grain_amplitude > 0:  # drawn last, so grain-free styles keep their random stream
        chosen = chosen + _grain(batch, height, width, style, generator)
    return chosen.clamp(BACKGROUND_MIN, BACKGROUND_MAX)
