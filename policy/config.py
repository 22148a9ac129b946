"""CompilerConfig: the policy compiler's knobs, quality presets, and the speedup search grid."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from ditplan.policy.plan import ROLES


class CompilerError(ValueError):
    """The compiler cannot build a plan from these traces and settings (the message says why)."""


# Preset knobs. recall_target: attention-mass share a sparse mask must keep (at the low quantile
# recall_quantile over prompts/steps). warmup_min_fraction / settle_tolerance: dense warm-up
# length. t_max / t_min: cache refresh interval at the start / end of the cached phase (Eq. 15).
QUALITY_PRESETS = {
    "high": dict(recall_target=0.95, recall_quantile=0.05, warmup_min_fraction=0.2,
                 settle_tolerance=0.25, t_max=4, t_min=2),
    "balanced": dict(recall_target=0.9, recall_quantile=0.1, warmup_min_fraction=0.12,
                     settle_tolerance=0.5, t_max=8, t_min=2),
    "fast": dict(recall_target=0.8, recall_quantile=0.1, warmup_min_fraction=0.08,
                 settle_tolerance=1.0, t_max=12, t_min=3),
}
# Searched for --target-speedup, from most to least conservative.
SEARCH_RECALL_TARGETS = (0.99, 0.95, 0.9, 0.85, 0.8, 0.7, 0.6)
SEARCH_INTERVALS = ((1, 1), (3, 2), (4, 2), (6, 2), (8, 2), (10, 3), (12, 3), (16, 4))


ESTIMATE_MODES = (None, "measured", "all")  # CompilerConfig.estimate_dropped


@dataclass(frozen=True)
class CompilerConfig:
    """Everything that decides a plan besides the traces (recorded in the plan's provenance)."""

    quality: str = "balanced"
    recall_target: float = 0.9
    recall_quantile: float = 0.1
    min_prediction_ratio: float = 0.85  # predicted/oracle recall below this: the layer stays dense
    head_spread: float = 0.15  # per-head densities when heads' densities spread more than this
    # heads whose recall never reaches the target stay dense while the layer's other heads run
    # sparse (off: such a layer is dense, or takes its head-mean density for every head)
    mixed_heads: bool = False
    # which sparse heads estimate their dropped key blocks from the blocks' mean keys and values
    # (policy.estimate; densities are chosen as without it): None, "measured" (those whose
    # profiled output error it lowers) or "all"; with None a target search tries both None and
    # "measured" where the traces record output errors
    estimate_dropped: str | None = None
    warmup_min_fraction: float = 0.12
    warmup_max_fraction: float = 0.5
    settle_tolerance: float = 0.5  # change within (1 + tol) x the mid-run plateau counts settled
    late_rise_factor: float = 1.5  # late steps changing more than this x plateau always compute
    caching: bool = True
    t_max: int = 8
    t_min: int = 2
    cfg_divergence: float = 0.2  # relative gap of the cond/uncond change curves for 2 schedules
    target_speedup: float | None = None
    min_psnr: float | None = None  # with --calibrate: the fastest plan measuring at least this
    calibrate_candidates: int = 12  # candidate plans --calibrate measures
    search_sigma: bool = False  # also search forecasts in sigma (traces with sigmas only)
    search_newton: bool = False  # also search Newton's order-2 extrapolation
    model_runs: bool = True  # also search runs that skip whole transformer calls (not under CP)
    refine_rounds: int = 0  # after calibration: rounds of moving single compute steps
    refine_candidates: int = 4  # neighbours measured per refine round
    roles: dict[str, str] = field(default_factory=dict)
    all_roles: str | None = None
    densities: dict[str, float] = field(default_factory=dict)
    fixed_density: float | None = None

    def __post_init__(self):
        if self.quality not in QUALITY_PRESETS:
            raise CompilerError(f"quality {self.quality!r}: use one of {sorted(QUALITY_PRESETS)}")
        for name in ("recall_target", "recall_quantile", "min_prediction_ratio"):
            if not 0.0 < getattr(self, name) <= 1.0:
                raise CompilerError(f"{name} must be in (0, 1], got {getattr(self, name)}")
        if not 1 <= self.t_min <= self.t_max:
            raise CompilerError(f"need 1 <= t_min <= t_max, got {self.t_min}, {self.t_max}")
        if self.target_speedup is not None and not self.target_speedup > 0:
            raise CompilerError(f"target speedup must be > 0, got {self.target_speedup}")
        if self.min_psnr is not None and not 0 < self.min_psnr < 200:
            raise CompilerError(f"min PSNR must be in (0, 200) dB, got {self.min_psnr}")
        if self.refine_rounds < 0 or self.refine_candidates < 1:
            raise CompilerError(f"need refine_rounds >= 0 and refine_candidates >= 1, got "
                                f"{self.refine_rounds}, {self.refine_candidates}")
        if self.estimate_dropped not in ESTIMATE_MODES:
            raise CompilerError(f"estimate_dropped must be one of {list(ESTIMATE_MODES)}, got "
                                f"{self.estimate_dropped!r}")
        if self.calibrate_candidates < 1:
            raise CompilerError(f"calibrate_candidates must be >= 1, got "
                                f"{self.calibrate_candidates}")
        bad = {b: r for b, r in self.roles.items() if r not in ROLES}
        if bad or self.all_roles not in (None, *ROLES):
            raise CompilerError(f"roles must be one of {list(ROLES)}, got {bad or self.all_roles}")
        dens = [*self.densities.values(), *([self.fixed_density] if self.fixed_density else [])]
        if self.fixed_density == 0 or any(not 0.0 < d <= 1.0 for d in dens):
            raise CompilerError(f"densities must be in (0, 1], got {dens}")

    @classmethod
    def from_name(cls, name: str, **overrides) -> CompilerConfig:
        """The preset ``name`` ("high" | "balanced" | "fast"), with keyword overrides."""
        if name not in QUALITY_PRESETS:
            raise CompilerError(f"unknown quality {name!r}; use one of {sorted(QUALITY_PRESETS)}")
        return cls(quality=name, **{**QUALITY_PRESETS[name], **overrides})

    def search_grid(self) -> list[CompilerConfig]:
        """Candidate settings for --target-speedup: recall targets x cache intervals."""
        intervals = SEARCH_INTERVALS if self.caching else ((1, 1),)
        return [
            dataclasses.replace(self, recall_target=r, t_max=t_max, t_min=t_min)
            for r in SEARCH_RECALL_TARGETS
            for t_max, t_min in intervals
        ]

    def to_settings(self) -> dict:
        """JSON-ready settings for the plan's provenance."""
        return dataclasses.asdict(self)
