"""The clip generator: deterministic per seed, masks match sprites, motion follows the caption."""

from __future__ import annotations

import re
from dataclasses import replace

import torch

from ditplan.reference.attributes import (
    COLOURS,
    DIRECTIONS,
    SHAPES,
    SPEEDS,
    captions_for,
    colour_table,
    direction_table,
    heldout_attributes,
    heldout_combinations,
    sample_attributes,
)
from ditplan.reference.clips import ClipSpec, _reflect, generate_clips, rasterize_sprites

SPEC = ClipSpec(frames=8, height=32, width=32)


def _single(spec: ClipSpec = SPEC, **kw) -> ClipSpec:
    return replace(spec, max_sprites=1, min_sprites=1, **kw)


def test_same_seed_same_clips_and_other_seed_differs():
    a, b = generate_clips(4, 7, spec=SPEC), generate_clips(4, 7, spec=SPEC)
    c = generate_clips(4, 8, spec=SPEC)
    assert torch.equal(a.video, b.video) and torch.equal(a.sprite_masks, b.sprite_masks)
    assert a.captions == b.captions
    assert not torch.equal(a.video, c.video)


def test_shapes_ranges_and_union_mask():
    clips = generate_clips(3, 0, spec=SPEC)
    assert clips.video.shape == (3, 3, 8, 32, 32)
    assert clips.sprite_masks.shape == (3, 3, 8, 32, 32)
    assert clips.centers.shape == (3, 3, 8, 2)
    assert clips.video.min() >= -1 and clips.video.max() <= 1
    assert torch.equal(clips.fg_mask, clips.sprite_masks.any(dim=1))
    # visible masks never overlap (occlusion resolved) and inactive slots are empty
    assert clips.sprite_masks.sum(dim=1).max() <= 1
    assert not clips.sprite_masks[~clips.attributes.active].any()


def test_mask_pixels_carry_the_sprite_colour_and_background_is_static():
    clips = generate_clips(6, 1, spec=SPEC)
    rgb = (clips.video + 1) / 2  # [B, 3, F, H, W]
    palette = colour_table()[clips.attributes.colour]  # [B, N, 3]
    for b in range(6):
        for n in range(3):
            mask = clips.sprite_masks[b, n]
            if mask.any():
                pixels = rgb[b][:, mask]  # [3, P]
                # exact up to the float round trip (x * 2 - 1 + 1) / 2
                assert torch.allclose(pixels, palette[b, n][:, None].expand_as(pixels), atol=1e-6)
        background = rgb[b][:, ~clips.fg_mask[b]]
        static = rgb[b, :, 0][:, ~clips.fg_mask[b].any(dim=0)]
        assert background.numel() > 0 and static.numel() > 0
        assert torch.equal(rgb[b][:, :, ~clips.fg_mask[b].any(dim=0)],
                           static[:, None].expand(-1, 8, -1))


def test_centroids_move_in_the_captioned_direction():
    spec = _single(ClipSpec(), bounce_prob=0.0)
    clips = generate_clips(16, 2, spec=spec)
    steps = direction_table()[clips.attributes.direction[:, 0]]  # [B, 2]
    mask = clips.sprite_masks[:, 0].float()  # [B, F, H, W]
    ys = torch.arange(48.0)[:, None] + 0.5
    xs = torch.arange(48.0)[None, :] + 0.5
    area = mask.sum(dim=(2, 3))
    centroid = torch.stack([(mask * xs).sum((2, 3)) / area, (mask * ys).sum((2, 3)) / area], -1)
    moved = centroid[:, -1] - centroid[:, 0]  # [B, 2]
    cosine = torch.nn.functional.cosine_similarity(moved, steps, dim=-1)
    assert (cosine > 0.97).all(), cosine
    assert not clips.bounced.any()
    # exact ground truth: constant per-frame step along the captioned direction
    deltas = clips.centers[:, 0, 1:] - clips.centers[:, 0, :-1]
    assert torch.allclose(deltas, deltas[:, :1].expand_as(deltas), atol=1e-4)


def _bounce_reference(start: float, velocity: float, lo: float, hi: float, frames: int):
    """Step-by-step simulation: move, and mirror off any border crossed."""
    x, v, path = start, velocity, [start]
    for _ in range(frames - 1):
        x += v
        while x < lo or x > hi:
            x, v = (2 * lo - x, -v) if x < lo else (2 * hi - x, -v)
        path.append(x)
    return path


def test_reflection_matches_step_by_step_bounces():
    g = torch.Generator().manual_seed(0)
    start = 5 + 38 * torch.rand(200, generator=g)
    velocity = 12 * torch.rand(200, generator=g) - 6  # up to several bounces per clip
    lo, hi = torch.full((200,), 5.0), torch.full((200,), 43.0)
    frames = torch.arange(16.0)
    fast = _reflect(start[:, None] + frames * velocity[:, None], lo[:, None], hi[:, None])
    for i in range(200):
        ref = _bounce_reference(start[i].item(), velocity[i].item(), 5.0, 43.0, 16)
        # float32 vectorized fold vs float64 loop: agreement to ~1e-4 px
        assert torch.allclose(fast[i], torch.tensor(ref, dtype=torch.float32), atol=1e-3)


def test_bouncing_sprites_stay_inside():
    spec = _single(ClipSpec(), bounce_prob=1.0)
    clips = generate_clips(32, 3, spec=spec)
    r = clips.radius[:, 0, None, None]
    assert (clips.centers[:, 0] >= r - 1e-4).all()
    assert (clips.centers[:, 0] <= 48 - r + 1e-4).all()
    assert clips.bounced.any() and not clips.bounced.all()


def test_sprite_covers_each_pixel_in_fewer_than_half_the_frames():
    # The scorer's temporal-median background is exact only under this property.
    clips = generate_clips(32, 4, spec=_single(ClipSpec(), bounce_prob=0.0))
    coverage = clips.fg_mask.sum(dim=1)  # [B, H, W]
    assert coverage.max() < 8


def test_heldout_set_is_balanced_and_never_sampled():
    combos = heldout_combinations()
    assert len(combos) == 64
    for field, size in enumerate((len(COLOURS), len(SHAPES), len(DIRECTIONS), len(SPEEDS))):
        counts = torch.bincount(torch.tensor([c[field] for c in combos]), minlength=size)
        assert (counts == 64 // size).all()
    attrs = sample_attributes(4096, torch.Generator().manual_seed(0))
    drawn = torch.stack([attrs.colour, attrs.shape, attrs.direction, attrs.speed], -1)
    drawn = {tuple(t) for t in drawn[attrs.active].tolist()}
    assert not drawn & combos
    assert len(drawn) == 512 - 64  # everything else does occur
    held = heldout_attributes()
    assert {tuple(t) for t in torch.cat([held.colour, held.shape, held.direction, held.speed],
                                        1).tolist()} == combos


def test_captions_are_grammatical_and_list_every_sprite():
    attrs = sample_attributes(256, torch.Generator().manual_seed(5))
    clause = (r"an? (red|orange|yellow|green|cyan|blue|purple|white) "
              r"(circle|square|triangle|diamond) (slowly|quickly) moves "
              r"(left|right|up|down|toward the (upper|lower) (left|right))")
    pattern = re.compile(rf"^{clause}(, {clause})* and {clause}$|^{clause}$")
    for caption, count in zip(captions_for(attrs), attrs.active.sum(1).tolist(), strict=True):
        assert pattern.match(caption), caption
        assert caption.count(" moves ") == count
        assert "a orange" not in caption



def _inside_reference(shape: str, dx: float, dy: float, r: float) -> bool:
    if shape == "circle":
        return dx * dx + dy * dy <= r * r
    if shape == "square":
        return abs(dx) <= r and abs(dy) <= r
    if shape == "diamond":
        return abs(dx) + abs(dy) <= r
    return -r <= dy <= r and 2 * abs(dx) <= dy + r  # triangle, apex up


def test_rasterizer_matches_per_pixel_reference():
    g = torch.Generator().manual_seed(3)
    centers = 4 + 12 * torch.rand(2, 4, 1, 2, generator=g)
    radius = 2 + 3 * torch.rand(2, 4, generator=g)
    shape = torch.arange(4).expand(2, 4)
    fast = rasterize_sprites(centers, radius, shape, 20, 20)
    for b in range(2):
        for n in range(4):
            cx, cy = centers[b, n, 0].tolist()
            r = radius[b, n].item()
            # exact: random float32 inputs sit on a pixel-centre boundary with probability ~0
            ref = torch.tensor([[_inside_reference(SHAPES[n], x + 0.5 - cx, y + 0.5 - cy, r)
                                 for x in range(20)] for y in range(20)])
            assert torch.equal(fast[b, n, 0], ref)
