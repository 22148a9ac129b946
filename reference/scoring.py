"""Pixel-only scores of single-sprite clips: caption following, motion, static background.

Segmentation needs no model: the background is the clip's per-pixel temporal median (exact for
the data, where a sprite covers any pixel in fewer than half the frames, see clips.ClipSpec), and
foreground is every pixel whose largest channel differs from it by more than FG_THRESHOLD. Per
frame the largest 8-connected foreground component, re-thresholded at half its own contrast, is
"the sprite"; its shape is the template (drawn by the generator's rasterizer into the same box)
it overlaps best. The scores assume one sprite per clip; the held-out evaluation set is
single-sprite for that reason, and `count_ok` reports whether exactly one object was drawn.
Every pixel constant holds at any frame size: the smallest object (MIN_PIXELS on a 48-pixel
frame) grows with the frame's area, as the sprites do (clips.ClipSpec).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import asdict, dataclass

import numpy as np
import torch
from scipy import ndimage

from ditplan.reference.attributes import (
    COLOUR_NAMES,
    DIRECTIONS,
    SHAPES,
    SPEEDS,
    SpriteAttributes,
    colour_table,
    direction_table,
)
from ditplan.reference.clips import REFERENCE_SIZE, rasterize_sprites

FG_THRESHOLD = 0.1  # data margin: palette vs background differ by >= 0.18 (attributes.COLOURS)
MIN_PIXELS = 6  # smaller components are noise, not sprites (on a 48-pixel frame: min_pixels)
ALIGNED_COS = 0.9  # a clip moves along its captioned direction: cosine above this (model cards)
_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)
# A box of w pixels fits radii in (w/2 - 1/2, w/2] depending on the sub-pixel position of the
# sprite; templates are tried at a few radii in that range (plus w/2 for blurry samples).
_RADIUS_OFFSETS = (-0.5, -0.25, 0.0)


@dataclass
class ClipScore:
    """Scores of one clip. Angles and distances are in pixels of the clip; NaN when undefined."""

    colour: str
    shape: str
    colour_ok: bool
    shape_ok: bool
    count_ok: bool
    direction_cos: float
    jitter_px: float
    speed_px: float
    background_std: float
    valid_frames: int


@dataclass
class _FrameBlob:
    pixels: int
    colour: np.ndarray  # [3] median RGB of the blob
    centroid: np.ndarray  # [2] (x, y)
    shape_iou: np.ndarray  # [num_shapes] IoU with each shape drawn into the blob's box
    touches_border: bool
    objects: int  # components of at least min_pixels of the frame
    mask: np.ndarray  # bool [H, W] the blob's pixels


def background_difference(frames: torch.Tensor) -> torch.Tensor:
    """Largest-channel absolute difference to the clip's temporal median background.

    Args:
        frames: float [B, F, H, W, 3] in [0, 1].

    Returns:
        float [B, F, H, W].
    """
    background = frames.median(dim=1, keepdim=True).values  # [B, 1, H, W, 3]
    return (frames - background).abs().amax(dim=-1)


def segment_foreground(frames: torch.Tensor, threshold: float = FG_THRESHOLD) -> torch.Tensor:
    """Foreground mask bool [B, F, H, W]: differs from the temporal median by > threshold."""
    return background_difference(frames) > threshold


def min_pixels(height: int, width: int) -> int:
    """The smallest object at a frame size: MIN_PIXELS scaled with the area of frames larger than
    48 x 48 (11 px at 64 x 64), MIN_PIXELS on smaller ones."""
    scale = min(height, width) / REFERENCE_SIZE
    return max(MIN_PIXELS, round(MIN_PIXELS * scale * scale))


def _components(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    labels, _ = ndimage.label(mask, structure=_EIGHT_CONNECTED)
    return labels, np.bincount(labels.ravel())[1:]


def _half_contrast_blob(diff: np.ndarray, coarse: np.ndarray) -> np.ndarray:
    """Re-thresholds a blob at half its own contrast: a blurred edge crosses 50% of the step
    at the true boundary, so this undoes the growth a fixed low threshold gives blurry sprites."""
    contrast = np.percentile(diff[coarse], 75)
    near = ndimage.binary_dilation(coarse, structure=_EIGHT_CONNECTED)
    labels, sizes = _components(near & (diff > max(FG_THRESHOLD, 0.5 * contrast)))
    return labels == (np.argmax(sizes) + 1) if len(sizes) else coarse


def _blob(frame: np.ndarray, diff: np.ndarray) -> _FrameBlob | None:
    labels, sizes = _components(diff > FG_THRESHOLD)
    least = min_pixels(*diff.shape)
    if len(sizes) == 0 or sizes.max() < least:
        return None
    largest = _half_contrast_blob(diff, labels == (np.argmax(sizes) + 1))
    ys, xs = np.nonzero(largest)
    top, bottom, left, right = ys.min(), ys.max(), xs.min(), xs.max()
    h, w = diff.shape
    return _FrameBlob(
        pixels=int(largest.sum()),
        colour=np.median(frame[largest], axis=0),
        centroid=np.array([xs.mean() + 0.5, ys.mean() + 0.5]),
        shape_iou=shape_ious(largest, (top, bottom, left, right)),
        touches_border=bool(top == 0 or left == 0 or bottom == h - 1 or right == w - 1),
        objects=int((sizes >= least).sum()),
        mask=largest,
    )


def shape_ious(blob: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
    """Best IoU of a blob with each shape rasterized, as the generator draws it, into its box.

    Template matching with the generator's own rasterizer makes the pixelation of 8-10 pixel
    sprites (a small circle is nearly a square) part of the template instead of an error.

    Args:
        blob: bool [H, W].
        box: (top, bottom, left, right) inclusive pixel bounds of the blob.

    Returns:
        float [num_shapes] IoUs in SHAPES order.
    """
    top, bottom, left, right = box
    centre = torch.tensor([(left + right + 1) / 2, (top + bottom + 1) / 2])
    half = max(bottom - top + 1, right - left + 1) / 2
    n, k = len(SHAPES), len(_RADIUS_OFFSETS)
    radii = torch.tensor([half + o for o in _RADIUS_OFFSETS]).repeat_interleave(n)
    shapes = torch.arange(n).repeat(k)
    templates = rasterize_sprites(centre.expand(1, n * k, 1, 2), radii[None], shapes[None],
                                  *blob.shape)[0, :, 0].numpy()  # [k * num_shapes, H, W]
    inter = (templates & blob).sum(axis=(1, 2))
    union = (templates | blob).sum(axis=(1, 2))
    return (inter / np.maximum(union, 1)).reshape(k, n).max(axis=0)


def nearest_colour(rgb: np.ndarray) -> int:
    """Index of the palette colour nearest (Euclidean RGB) to `rgb` [3]."""
    palette = colour_table().numpy()
    return int(np.argmin(((palette - rgb) ** 2).sum(axis=1)))


def _motion(blobs: list[_FrameBlob | None], direction: np.ndarray) -> tuple[float, float, float]:
    """(cosine to `direction`, jitter, speed) from the blob centroids of consecutive frames."""
    frames = np.array([i for i, b in enumerate(blobs) if b is not None])
    if len(frames) < 4:
        return float("nan"), float("nan"), float("nan")
    centroids = np.stack([blobs[i].centroid for i in frames])  # [V, 2]
    velocity = np.polyfit(frames, centroids, deg=1)[0]  # [2] px per frame, least squares
    speed = float(np.linalg.norm(velocity))
    cosine = float(velocity @ direction / (speed * np.linalg.norm(direction) + 1e-9))
    consecutive = np.diff(frames) == 1
    steps = np.diff(centroids, axis=0)[consecutive]
    if len(steps) < 2:
        return cosine, float("nan"), speed
    jitter = float(np.sqrt(((steps - steps.mean(axis=0)) ** 2).sum(axis=1).mean()))
    return cosine, jitter, speed


def _background_std(frames: np.ndarray, blobs: list[_FrameBlob]) -> float:
    """Mean temporal std of the pixels that the sprite never covers (its blobs dilated by 1 px).
    Flicker elsewhere counts: it is exactly what a static background must not have."""
    if not blobs:
        return float(frames.std(axis=0).mean())
    path = np.logical_or.reduce([b.mask for b in blobs])
    ever = ndimage.binary_dilation(path, structure=_EIGHT_CONNECTED)  # [H, W]
    if ever.all():
        return float("nan")
    return float(frames.std(axis=0).mean(axis=-1)[~ever].mean())


def score_clip(frames: np.ndarray, diff: np.ndarray, colour: int, shape: int,
               direction: np.ndarray) -> ClipScore:
    """Scores one clip against its caption.

    Args:
        frames: float [F, H, W, 3] in [0, 1].
        diff: float [F, H, W] from background_difference.
        colour, shape: caption indices into COLOURS / SHAPES.
        direction: float [2] captioned step direction (x, y).
    """
    blobs = [_blob(frames[f], diff[f]) for f in range(frames.shape[0])]
    valid = [b for b in blobs if b is not None]
    shaped = [b for b in valid if not b.touches_border] or valid
    if valid:
        rgb = np.median(np.stack([b.colour for b in valid]), axis=0)
        got_colour = nearest_colour(rgb)
        got_shape = int(np.argmax(np.mean([b.shape_iou for b in shaped], axis=0)))
        objects = int(np.median([b.objects for b in blobs if b is not None]))
    else:
        got_colour, got_shape, objects = -1, -1, 0
    cosine, jitter, speed = _motion(blobs, direction)
    return ClipScore(
        colour=COLOUR_NAMES[got_colour] if got_colour >= 0 else "none",
        shape=SHAPES[got_shape] if got_shape >= 0 else "none",
        colour_ok=got_colour == colour,
        shape_ok=got_shape == shape,
        count_ok=objects == 1,
        direction_cos=cosine,
        jitter_px=jitter,
        speed_px=speed,
        background_std=_background_std(frames, valid),
        valid_frames=len(valid),
    )


def score_clips(frames: torch.Tensor, attributes: SpriteAttributes) -> list[ClipScore]:
    """Scores single-sprite clips against the attributes of their captions.

    Args:
        frames: float [B, F, H, W, 3] in [0, 1] (pipeline output, or data via to_frames).
        attributes: SpriteAttributes [B, 1] (slot 0 is the captioned sprite).

    Returns:
        B ClipScores.
    """
    if attributes.num_slots != 1 or not bool(attributes.active.all()):
        raise ValueError("score_clips scores single-sprite captions only (attributes [B, 1])")
    frames = frames.detach().float().cpu()
    diff = background_difference(frames).numpy()
    directions = direction_table()[attributes.direction[:, 0].cpu()].numpy()
    arrays = frames.numpy()
    with _one_torch_thread():
        return [
            score_clip(arrays[i], diff[i], int(attributes.colour[i, 0]),
                       int(attributes.shape[i, 0]), directions[i])
            for i in range(arrays.shape[0])
        ]


@contextmanager
def _one_torch_thread():
    """Per-frame scoring runs thousands of torch ops on 64 x 64 frames: a thread pool only adds
    wake-ups, and where other processes share the cores (an evaluation beside a GPU job on a
    32-core host) oversubscription made them far slower (2.5x here at 4 threads a core)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def to_frames(video: torch.Tensor) -> torch.Tensor:
    """Data video [B, 3, F, H, W] in [-1, 1] -> frames [B, F, H, W, 3] in [0, 1]."""
    return ((video.clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 4, 1)


def aligned_clips(scores: list[ClipScore]) -> np.ndarray:
    """bool [B]: the clip moves along its captioned direction (cosine > ALIGNED_COS; NaN, no
    measurable motion, compares False: not aligned)."""
    return np.array([s.direction_cos for s in scores], dtype=float) > ALIGNED_COS


def aligned_by_attribute(scores: list[ClipScore], attributes: SpriteAttributes) -> dict:
    """The share of clips moving along their captioned direction (as in :func:`summarize`), per
    captioned direction and per speed word: {"direction": {name: share}, "speed": {...}}.

    Args:
        scores: one per clip, in the order of ``attributes`` [B, 1].
    """
    aligned = aligned_clips(scores)
    out = {}
    for key, names, index in (("direction", list(DIRECTIONS), attributes.direction),
                              ("speed", list(SPEEDS), attributes.speed)):
        index = index[:, 0].cpu().numpy()
        out[key] = {name: float(aligned[index == i].mean())
                    for i, name in enumerate(names) if (index == i).any()}
    return out


def summarize(scores: list[ClipScore]) -> dict:
    """Aggregates ClipScores: accuracies (share of clips), the share of clips moving along the
    captioned direction (cosine > ALIGNED_COS; no measurable motion counts as not), and
    mean/median of the motion and background statistics over the clips where they are
    defined."""
    table = {k: np.array([asdict(s)[k] for s in scores]) for k in asdict(scores[0])}
    both = table["colour_ok"] & table["shape_ok"]
    out = {
        "clips": len(scores),
        "colour_accuracy": float(table["colour_ok"].mean()),
        "shape_accuracy": float(table["shape_ok"].mean()),
        "caption_accuracy": float(both.mean()),
        "caption_and_count_accuracy": float((both & table["count_ok"]).mean()),
        "direction_aligned": float(aligned_clips(scores).mean()),
    }
    for key in ("direction_cos", "jitter_px", "speed_px", "background_std"):
        values = table[key].astype(float)
        defined = values[~np.isnan(values)]
        out[f"{key}_mean"] = float(defined.mean()) if len(defined) else float("nan")
        out[f"{key}_median"] = float(np.median(defined)) if len(defined) else float("nan")
        out[f"{key}_defined"] = int(len(defined))
    return out
