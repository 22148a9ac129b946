"""Clip-size curriculum of a training run: which clip geometry each global step trains on."""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

from ditplan.reference.clips import ClipSpec

_STAGE = re.compile(r"^(\d+)x(\d+)x(\d+):(\d+)$")


class CurriculumError(ValueError):
    """A curriculum string is malformed or does not fit the model's patch size."""


@dataclass(frozen=True)
class Stage:
    """Clips of frames x height x width pixels for the global steps before `until_step`."""

    frames: int
    height: int
    width: int
    until_step: int


def parse_curriculum(text: str | None) -> tuple[Stage, ...]:
    """Parses 'FxHxW:STEP[,FxHxW:STEP...]', e.g. '16x64x64:800': steps 0-799 train on 16-frame
    64 x 64 clips, later steps on the preset's clips. None or '' is no curriculum.

    Raises:
        CurriculumError: malformed text, a stage under 2 frames, or steps not increasing.
    """
    stages = []
    for part in (text or "").replace(" ", "").split(","):
        if not part:
            continue
        match = _STAGE.match(part)
        if match is None:
            raise CurriculumError(f"curriculum stage {part!r} is not FRAMESxHEIGHTxWIDTH:STEP")
        stages.append(Stage(*(int(g) for g in match.groups())))
    for stage in stages:
        if stage.frames < 2 or stage.height < 1 or stage.width < 1:
            raise CurriculumError(f"{stage}: clips need >= 2 frames and a positive size")
    ends = [s.until_step for s in stages]
    if any(b <= a for a, b in zip([0, *ends], ends, strict=False)):
        raise CurriculumError(f"curriculum stage ends must increase from above 0, got {ends}")
    return tuple(stages)


def check_patch(stages: tuple[Stage, ...], patch_size: tuple[int, int, int]) -> None:
    """Raises CurriculumError unless every stage's clip size is a multiple of the patch size."""
    pt, ph, pw = patch_size
    for stage in stages:
        if stage.frames % pt or stage.height % ph or stage.width % pw:
            raise CurriculumError(f"{stage} is not a multiple of the patch size {patch_size}")


def clip_spec_at(base: ClipSpec, stages: tuple[Stage, ...], step: int) -> ClipSpec:
    """The clip spec of global `step`: the first stage that has not ended, else `base`. A stage
    changes only the geometry; sprite sizes and speeds scale with its frame as ClipSpec says."""
    for stage in stages:
        if step < stage.until_step:
            return replace(base, frames=stage.frames, height=stage.height, width=stage.width)
    return base
