"""The plan contract (stdlib only): written by the policy compiler, read by the runtime."""

from __future__ import annotations

from dataclasses import dataclass, field

SUPPORTED_BLOCK_SIZES = (64, 128)


class PlanError(ValueError):
    """A plan, or a piece of one, is malformed or does not fit the model it is applied to."""


@dataclass(frozen=True)
class AttentionSpec:
    """How one self-attention layer runs: dense, or block-mean sparse with these settings.

    Exactly one of ``density`` (share of key blocks kept per query-block row, top-n) and
    ``mass_threshold`` (fewest key blocks whose predicted attention mass reaches it) is set;
    ``density=1.0`` means dense. ``dense_steps`` lists denoising step indices that run dense
    (warm-up, and any late steps the compiler keeps dense).
    """

    density: float | None = 1.0
    mass_threshold: float | None = None
    block_size: int = 128
    tile: tuple[int, int, int] = (1, 8, 8)
    sink: bool = True
    dense_steps: tuple[int, ...] = field(default_factory=tuple)

    def __post_init__(self):
        if (self.density is None) == (self.mass_threshold is None):
            raise PlanError("set exactly one of density and mass_threshold")
        if self.density is not None and not 0.0 < self.density <= 1.0:
            raise PlanError(f"density must be in (0, 1], got {self.density}")
        if self.mass_threshold is not None and not 0.0 < self.mass_threshold <= 1.0:
            raise PlanError(f"mass_threshold must be in (0, 1], got {self.mass_threshold}")
        if self.block_size not in SUPPORTED_BLOCK_SIZES:
            raise PlanError(
                f"block_size {self.block_size} is not supported; use one of {SUPPORTED_BLOCK_SIZES}"
            )
        if len(self.tile) != 3 or any(int(t) < 1 for t in self.tile):
            raise PlanError(f"tile must be three positive ints (frames, height, width), got {self.tile}")
        if any(int(s) < 0 for s in self.dense_steps):
            raise PlanError(f"dense_steps must be non-negative step indices, got {self.dense_steps}")
        object.__setattr__(self, "tile", tuple(int(t) for t in self.tile))
        object.__setattr__(self, "dense_steps", tuple(sorted({int(s) for s in self.dense_steps})))

    @property
    def is_dense(self) -> bool:
        return self.density == 1.0

    def dense_at(self, step: int | None) -> bool:
        """True when this layer runs dense attention at denoising step ``step``."""
        return self.is_dense or (step is not None and step in self.dense_steps)
