"""Static, smooth, desaturated clip backgrounds: colour fields, gradients, soft textures."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# Backgrounds stay inside this range in every channel, so every palette colour (which has a
# channel >= 0.9) differs from them by >= 0.18 somewhere; see attributes.COLOURS.
BACKGROUND_MIN = 0.15
BACKGROUND_MAX = 0.72
KINDS = ("field", "gradient", "texture")


def _uniform(shape, low, high, generator) -> torch.Tensor:
    return low + (high - low) * torch.rand(shape, generator=generator, device=generator.device)


def _base_colour(batch: int, generator: torch.Generator) -> torch.Tensor:
    grey = _uniform((batch, 1), 0.30, 0.55, generator)
    tint = _uniform((batch, 3), -0.07, 0.07, generator)
    return grey + tint  # [B, 3]


def _colour_field(base, height, width, amplitude, generator) -> torch.Tensor:
    batch = base.shape[0]
    coarse = base[:, :, None, None] + _uniform((batch, 3, 3, 3), -amplitude, amplitude, generator)
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


def _texture(base, height, width, generator) -> torch.Tensor:
    batch = base.shape[0]
    field = _colour_field(base, height, width, 0.06, generator)
    proj, ys, xs = _coordinates(batch, height, width, generator)
    cycles = torch.randint(3, 7, (batch, 1, 1), generator=generator, device=generator.device)
    phase = _uniform((batch, 1, 1), 0.0, 2 * math.pi, generator)
    stripes = torch.sin(2 * math.pi * cycles * proj + phase)
    checker = torch.sin(2 * math.pi * cycles * xs[None, None, :] + phase) * torch.sin(
        2 * math.pi * cycles * ys[None, :, None]
    )
    use_checker = torch.rand((batch, 1, 1), generator=generator, device=generator.device) < 0.5
    pattern = torch.where(use_checker, checker, stripes).unsqueeze(1)  # [B, 1, H, W]
    return field + 0.05 * pattern


def render_backgrounds(
    batch: int, height: int, width: int, generator: torch.Generator
) -> torch.Tensor:
    """Draws one static background per clip: a smooth colour field, a gradient or a soft texture.

    Args:
        batch: number of backgrounds B.
        height, width: size in pixels.
        generator: the only source of randomness; its device is where the result lives.

    Returns:
        float [B, 3, H, W] RGB in [BACKGROUND_MIN, BACKGROUND_MAX].
    """
    base = _base_colour(batch, generator)
    candidates = torch.stack(
        [
            _colour_field(base, height, width, 0.12, generator),
            _gradient(base, height, width, generator),
            _texture(base, height, width, generator),
        ]
    )  # [kinds, B, 3, H, W]
    kind = torch.randint(0, len(KINDS), (batch,), generator=generator, device=generator.device)
    chosen = candidates[kind, torch.arange(batch, device=generator.device)]
    return chosen.clamp(BACKGROUND_MIN, BACKGROUND_MAX)
