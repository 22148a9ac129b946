"""Benchmark workloads (size, steps, guidance, sparsity block, tile), presets and model suites."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path


@dataclass(frozen=True)
class Workload:
    """One generation setting of the reference model; plans are compiled for exactly this."""

    steps: int = 32
    frames: int = 16
    height: int = 48
    width: int = 48
    guidance_scale: float = 4.0
    block_size: int = 128
    tile: tuple[int, int, int] = (1, 8, 8)

    def __post_init__(self):
        object.__setattr__(self, "tile", tuple(int(t) for t in self.tile))
        for name in ("steps", "frames", "height", "width"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"--{name} must be >= 1, got {getattr(self, name)}")
        if self.block_size not in (64, 128):
            raise ValueError(f"--block-size must be 64 or 128, got {self.block_size}")

    def key(self) -> str:
        """A short stable hash: rows and profile caches are only reused for the same workload."""
        text = json.dumps(asdict(self), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]

    def as_dict(self) -> dict:
        """JSON-ready fields."""
        return {**asdict(self), "tile": list(self.tile)}


# The model card's evaluation workload: 16 x 48 x 48 px = 9,216 tokens (72 blocks of 128).
FULL = Workload()
# CPU minutes: the README's 8 x 32 x 32 px workload (2,048 tokens), 4 steps.
QUICK = Workload(steps=4, frames=8, height=32, width=32)


# The long-sequence model's evaluation workload: 32 x 64 x 64 px = 32,768 tokens (256 blocks of
# 128), its 32 sampling steps, guidance 4 (reference/config.py LONG, its model card), tiles of
# 8 x 4 x 4 tokens: its shipped traces' tile, where sparse attention keeps the most (BENCHMARKS.md,
# issue 15, session 20: 30.9 dB at density 0.2 against 29.1 at 1 x 8 x 8).
LONG = Workload(frames=32, height=64, width=64, tile=(8, 4, 4))

LONG_MODEL_NAME = "ditplan-ref-t2v-long"
LONG_MISSING = ("the long model's weights are missing from {path} (no model_index.json): train "
                "it: tools/train_reference.py --long --out artifacts/runs/long --time-budget-min 8 "
                "(repeat to step 2,000), then export: tools/train_reference.py --long --out "
                "artifacts/runs/long --max-steps 0 --export {path}; or pass --model DIR")


@dataclass(frozen=True)
class Suite:
    """A model and its workloads: the full and ``--quick`` ones, the default number of held-out
    captions, and how its traces are profiled (ProfileConfig's mode; how many evenly spaced
    steps get exact attention statistics, None: every step; the steps whose block maps are
    stored, None: the profiler's first, middle and last; whether sparse attention's output
    error is recorded too)."""

    name: str
    full: Workload
    quick: Workload
    captions: int
    profile_mode: str = "auto"
    attention_steps: int | None = None
    map_steps: tuple[int, ...] | None = None
    output_error: bool = False

    def workload_from(self, quick: bool, **overrides) -> Workload:
        """The full or quick workload with the given fields replaced (None values ignored)."""
        given = {k: v for k, v in overrides.items() if v is not None}
        return replace(self.quick if quick else self.full, **given)

    def profile_settings(self, steps: int) -> dict:
        """ProfileConfig fields beyond the workload for a profile of ``steps`` steps."""
        settings = {"mode": self.profile_mode, "output_error": self.output_error}
        if self.map_steps is not None:
            settings["map_steps"] = self.map_steps
        if self.attention_steps is not None:
            settings["attention_steps"] = evenly_spaced(steps, self.attention_steps)
        return settings


def evenly_spaced(steps: int, count: int) -> tuple[int, ...]:
    """``count`` step indices spread over 0..steps-1, first and last included (fewer when
    ``steps`` is smaller)."""
    if count <= 1 or steps == 1:
        return (0,)
    return tuple(sorted({round(i * (steps - 1) / (count - 1)) for i in range(count)}))


REFERENCE_SUITE = Suite("reference", FULL, QUICK, captions=32)
# The long model: profiled by sampling, as its numbers so far were (clip mode would now draw its
# own training clips too: ditplan.reference.export.trained_preset),
# with exact attention statistics at 8 of the steps (each costs ~20 forwards at 32,768 tokens);
# no block maps (256 x 256 per head and step, ~50 MB per prompt at three steps; the compiler
# does not read them), so the traces are small enough to ship. 8 held-out captions keep the
# whole grid within about 10 GPU minutes.
LONG_SUITE = Suite("long", LONG, QUICK, captions=8, profile_mode="sample", attention_steps=8,
                   map_steps=(), output_error=True)  # its -estimated rows choose heads by it
SUITES = {s.name: s for s in (REFERENCE_SUITE, LONG_SUITE)}


def long_model_dir() -> Path:
    """Where the long model is shipped: beside the reference model, under ditplan.artifacts."""
    from ditplan.runtime.loading import reference_model_dir

    return reference_model_dir().parent / LONG_MODEL_NAME
