"""Procedural clips with ground truth: static background, 1-3 moving sprites, captions, masks."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ditplan.reference.attributes import (
    SHAPES,
    SpriteAttributes,
    captions_for,
    colour_table,
    direction_table,
    sample_attributes,
)
from ditplan.reference.backgrounds import BackgroundStyle, render_backgrounds

REFERENCE_SIZE = 48.0  # sizes and speeds below are in pixels of a 48-pixel frame, then scaled


@dataclass(frozen=True)
class ClipSpec:
    """What a clip looks like. Sizes and speeds are given for a 48 x 48 frame and scale with it.

    A sprite covers any pixel for at most 2 * radius / speed + 1 frames, under half the clip
    (defaults: radius <= 5, speed >= 1.6 px/frame per axis, < 8 of 16 frames), so the temporal
    median of a clip is its background: the pixel scorer relies on this.
    """

    frames: int = 16
    height: int = 48
    width: int = 48
    max_sprites: int = 3
    min_sprites: int = 1
    radius_range: tuple[float, float] = (4.0, 5.0)  # half the bounding-box side (>= 4: a smaller
    # diamond can rasterize to the same pixels as a circle, and the scorer could not tell)
    slow_speed: tuple[float, float] = (1.6, 1.9)  # px per frame along each moving axis
    fast_speed: tuple[float, float] = (2.2, 2.5)
    bounce_prob: float = 0.2  # share of sprites whose start allows hitting a border
    background: BackgroundStyle = BackgroundStyle()

    @property
    def scale(self) -> float:
        return min(self.height, self.width) / REFERENCE_SIZE


@dataclass
class ClipBatch:
    """A batch of clips and their ground truth.

    video: float [B, 3, F, H, W] in [-1, 1]. fg_mask: bool [B, F, H, W], union of sprites.
    sprite_masks: bool [B, N, F, H, W], visible pixels of each sprite after occlusion (slot N-1
    is in front). centers: float [B, N, F, 2], (x, y) bounding-box centre in pixels (pixel i
    spans [i, i+1)). radius: float [B, N]. bounced: bool [B, N]. captions: B strings.
    """

    video: torch.Tensor
    fg_mask: torch.Tensor
    sprite_masks: torch.Tensor
    centers: torch.Tensor
    radius: torch.Tensor
    bounced: torch.Tensor
    attributes: SpriteAttributes
    captions: list[str]


def _uniform(shape, bounds, generator) -> torch.Tensor:
    low, high = bounds
    return low + (high - low) * torch.rand(shape, generator=generator, device=generator.device)


def _trajectories(attributes, spec, generator):
    """Centres [B, N, F, 2], radius [B, N], bounced [B, N]: constant velocity, reflected."""
    dev = generator.device
    shape = (attributes.batch_size, attributes.num_slots)
    radius = _uniform(shape, spec.radius_range, generator) * spec.scale
    slow = _uniform(shape, spec.slow_speed, generator)
    fast = _uniform(shape, spec.fast_speed, generator)
    speed = torch.where(attributes.speed == 0, slow, fast) * spec.scale
    velocity = direction_table(dev)[attributes.direction] * speed[..., None]  # [B, N, 2]
    lo = radius[..., None].expand(*shape, 2)  # [B, N, 2] allowed centre range, (x, y)
    hi = torch.stack([spec.width - radius, spec.height - radius], dim=-1)
    travel = velocity * (spec.frames - 1)
    free = torch.rand(shape, generator=generator, device=dev)[..., None] < spec.bounce_prob
    start_lo = torch.where(free, lo, torch.minimum(lo + (-travel).clamp_min(0), hi))
    start_hi = torch.where(free, hi, torch.maximum(hi - travel.clamp_min(0), lo))
    start = start_lo + (start_hi - start_lo) * torch.rand(
        start_lo.shape, generator=generator, device=dev)
    frame = torch.arange(spec.frames, dtype=torch.float32, device=dev)
    raw = start[:, :, None] + frame[None, None, :, None] * velocity[:, :, None]  # [B, N, F, 2]
    centers = _reflect(raw, lo[:, :, None], hi[:, :, None])
    bounced = ((raw < lo[:, :, None] - 1e-4) | (raw > hi[:, :, None] + 1e-4)).any(-1).any(-1)
    return centers, radius, bounced


def _reflect(x, lo, hi) -> torch.Tensor:
    span = (hi - lo).clamp_min(1e-6)
    phase = torch.remainder(x - lo, 2 * span)
    return lo + torch.where(phase > span, 2 * span - phase, phase)


def rasterize_sprites(
    centers: torch.Tensor, radius: torch.Tensor, shape: torch.Tensor, height: int, width: int
) -> torch.Tensor:
    """Hard-edged sprite masks: pixel (y, x) is inside if its centre (x+0.5, y+0.5) is.

    Args:
        centers: float [B, N, F, 2] (x, y) centres in pixels.
        radius: float [B, N] half the bounding-box side.
        shape: long [B, N] indices into SHAPES (triangles point up).
        height, width: frame size in pixels.

    Returns:
        bool [B, N, F, H, W].
    """
    dev = centers.device
    xs = torch.arange(width, dtype=torch.float32, device=dev) + 0.5
    ys = torch.arange(height, dtype=torch.float32, device=dev) + 0.5
    dx = xs - centers[..., 0:1].unsqueeze(-2)  # [B, N, F, 1, W]
    dy = ys[:, None] - centers[..., 1:2].unsqueeze(-1)  # [B, N, F, H, 1]
    r = radius[:, :, None, None, None]
    inside = {
        "circle": dx * dx + dy * dy <= r * r,
        "square": (dx.abs() <= r) & (dy.abs() <= r),
        "triangle": (dy >= -r) & (dy <= r) & (2 * dx.abs() <= dy + r),
        "diamond": dx.abs() + dy.abs() <= r,
    }
    kind = shape[:, :, None, None, None]
    mask = torch.zeros(torch.broadcast_shapes(dx.shape, dy.shape), dtype=torch.bool, device=dev)
    for index, name in enumerate(SHAPES):
        mask |= inside[name] & (kind == index)
    return mask


def _composite(background, full_masks, attributes):
    """Paints sprites back to front. Returns video [B, 3, F, H, W] in [0, 1], visible masks."""
    frames = full_masks.shape[2]
    video = background[:, :, None].expand(-1, -1, frames, -1, -1)
    colours = colour_table(background.device)[attributes.colour]  # [B, N, 3]
    masks = full_masks & attributes.active[:, :, None, None, None]
    covered_above = torch.zeros_like(masks[:, 0])
    visible = torch.zeros_like(masks)
    for n in reversed(range(masks.shape[1])):
        visible[:, n] = masks[:, n] & ~covered_above
        covered_above |= masks[:, n]
    for n in range(masks.shape[1]):
        paint = colours[:, n, :, None, None, None]  # [B, 3, 1, 1, 1]
        video = torch.where(masks[:, n, None], paint, video)
    return video, visible


def render_clips(
    attributes: SpriteAttributes,
    generator: torch.Generator,
    spec: ClipSpec = ClipSpec(),
    captions: list[str] | None = None,
) -> ClipBatch:
    """Renders clips for given sprite attributes; positions, sizes and backgrounds are drawn.

    Args:
        attributes: SpriteAttributes [B, N] on the generator's device.
        generator: the only source of randomness; rendering happens on its device.
        spec: clip geometry and motion ranges.
        captions: captions for `attributes` if already made (avoids a device-to-host read).

    Returns:
        ClipBatch on the generator's device.
    """
    if attributes.colour.device.type != generator.device.type:
        raise ValueError(
            f"attributes on {attributes.colour.device} but generator on {generator.device}")
    background = render_backgrounds(attributes.batch_size, spec.height, spec.width, generator,
                                    spec.background)
    centers, radius, bounced = _trajectories(attributes, spec, generator)
    full = rasterize_sprites(centers, radius, attributes.shape, spec.height, spec.width)
    video, visible = _composite(background, full, attributes)
    return ClipBatch(
        video=video * 2 - 1,
        fg_mask=visible.any(dim=1),
        sprite_masks=visible,
        centers=centers,
        radius=radius,
        bounced=bounced & attributes.active,
        attributes=attributes,
        captions=captions if captions is not None else captions_for(attributes),
    )


def generate_clips(
    batch_size: int,
    seed: int,
    *,
    device: torch.device | str = "cpu",
    spec: ClipSpec = ClipSpec(),
    exclude_heldout: bool = True,
) -> ClipBatch:
    """Draws and renders a batch of clips, deterministic for (seed, device).

    Attributes and captions are drawn on the CPU (no device-to-host sync on GPU), the pixels on
    `device` from a generator seeded with the same seed.

    Args:
        batch_size: number of clips B.
        seed: the clip batch's seed.
        device: where the pixels are rendered.
        spec: clip geometry and motion ranges.
        exclude_heldout: never draw the 64 held-out (colour, shape, direction, speed) sprites.

    Returns:
        ClipBatch on `device`.
    """
    device = torch.device(device)
    host = torch.Generator().manual_seed(seed)
    attributes = sample_attributes(
        batch_size, host, max_sprites=spec.max_sprites, min_sprites=spec.min_sprites,
        exclude_heldout=exclude_heldout)
    captions = captions_for(attributes)
    if device.type == "cuda":
        attributes = attributes.pin_memory().to(device, non_blocking=True)
    else:
        attributes = attributes.to(device)
    pixels = torch.Generator(device=device).manual_seed(seed)
    return render_clips(attributes, pixels, spec, captions=captions)
