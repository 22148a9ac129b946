"""Noised-clip inputs for profiling the reference model: caption -> clip -> teacher-forced x_t.

The reference model's captions come from a closed grammar, so a caption names its sprites
exactly; the clip generator renders those sprites (positions and background drawn from the seed)
with a ground-truth foreground mask. During profiling the pipeline's own latents are replaced
after every step by x_t = (1 - sigma_{i+1}) x0 + sigma_{i+1} noise (rectified flow, one fixed
noise per seed): the model sees its training distribution at every sigma of the sampler, its
CFG branches and step indices stay the pipeline's, and the ground-truth mask applies at every
step.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Callable

import torch

from ditplan.reference.attributes import (
    COLOURS,
    DIRECTIONS,
    SHAPES,
    SPEEDS,
    SpriteAttributes,
    clause,
)
from ditplan.reference.clips import ClipBatch, ClipSpec, render_clips
from ditplan.reference.flow import noisy_sample

_COMBINATIONS = itertools.product(*(range(len(t)) for t in (COLOURS, SHAPES, DIRECTIONS, SPEEDS)))
_CLAUSES = {clause(*combo): combo for combo in _COMBINATIONS}  # one sprite's words -> indices


class CaptionParseError(ValueError):
    """A prompt is not a reference-model caption, so no ground-truth clip can be drawn for it."""


def parse_reference_caption(caption: str, max_sprites: int = 3) -> SpriteAttributes:
    """Sprite attributes named by a caption, e.g. 'a red circle slowly moves left and ...'.

    Args:
        caption: clauses joined by ', ' and ' and ' (the captions_for grammar).
        max_sprites: most sprites a clip holds.

    Returns:
        SpriteAttributes [1, number of clauses], on the CPU.
    """
    text = " ".join(caption.lower().replace(",", " , ").split()).replace(" ,", ",")
    clauses = [c.strip() for c in re.split(r",\s*|\s+and\s+", text) if c.strip()]
    unknown = [c for c in clauses if c not in _CLAUSES]
    if not clauses or unknown:
        raise CaptionParseError(
            f"prompt {caption!r} is not a reference caption (unparsed: {unknown or [caption]}); "
            f"write clauses like {next(iter(_CLAUSES))!r} joined by ', ' and ' and ', or use "
            "--mode sample")
    if len(clauses) > max_sprites:
        raise CaptionParseError(f"prompt {caption!r} names {len(clauses)} sprites; the "
                                f"reference clips hold at most {max_sprites}")
    cols = list(zip(*(_CLAUSES[c] for c in clauses), strict=True))
    as_long = [torch.tensor(col, dtype=torch.long)[None] for col in cols]  # [1, N] each
    return SpriteAttributes(*as_long, active=torch.ones(1, len(clauses), dtype=torch.bool))


def reference_clip(caption: str, seed: int, spec: ClipSpec, device: str | torch.device
                   ) -> ClipBatch:
    """The clip a caption describes, with positions and background drawn from ``seed``.

    Returns:
        ClipBatch of one clip on ``device``: video [1, 3, F, H, W] in [-1, 1], fg_mask
        [1, F, H, W].
    """
    attributes = parse_reference_caption(caption, spec.max_sprites).to(device)
    generator = torch.Generator(device=device).manual_seed(seed)
    return render_clips(attributes, generator, spec, captions=[caption])


class TeacherForcing:
    """Initial latents and a step-end callback that keep x_t on the clip's noising path.

    Args:
        x0: float [1, C, F, H, W], the clean clip.
        seed: seeds the fixed noise (drawn on the CPU, so every device sees the same).
        sigmas: the scheduler's sigmas, float [steps + 1] (the last is 0).
    """

    def __init__(self, x0: torch.Tensor, seed: int, sigmas: torch.Tensor):
        generator = torch.Generator().manual_seed(seed)
        self.x0 = x0.float()
        self.noise = torch.randn(x0.shape, generator=generator).to(x0.device)
        self.sigmas = sigmas.float().cpu()

    def latents_at(self, index: int) -> torch.Tensor:
        """x_t at sigma index ``index``: float [1, C, F, H, W]."""
        sigma = self.sigmas[index].reshape(1).to(self.x0.device)
        return noisy_sample(self.x0, self.noise, sigma)

    def callback(self) -> Callable:
        """callback_on_step_end(pipe, i, t, tensors) returning the next step's latents."""

        def on_step_end(pipe, step: int, timestep, tensors: dict) -> dict:
            return {"latents": self.latents_at(step + 1)}

        return on_step_end
