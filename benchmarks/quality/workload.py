"""The benchmark workload (size, steps, guidance, sparsity block and tile) and its presets."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, replace


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


def workload_from(quick: bool, **overrides) -> Workload:
    """The preset (QUICK or FULL) with the given fields replaced (None values are ignored)."""
    given = {k: v for k, v in overrides.items() if v is not None}
    return replace(QUICK if quick else FULL, **given)
