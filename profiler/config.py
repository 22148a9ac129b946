"""Profiler settings: what to profile (ProfileConfig) and how to measure (RecorderSettings)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from ditplan.profiler.schema import DENSITY_GRID
from ditplan.runtime.pipeline_calls import PipelineCall

MODES = ("auto", "clip", "sample")
DTYPES = ("float32", "bfloat16", "float16")
BLOCK_SIZES = (64, 128)
DEFAULT_FRAMES = 16  # a video pipeline's frames when none are given (image pipelines make one)
DEFAULT_PROMPTS = (
    "a red circle slowly moves right",
    "a blue square quickly moves toward the lower left and a yellow triangle slowly moves up",
)


class ProfileConfigError(ValueError):
    """A profiler setting is out of range or malformed; the message says which and why."""


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ProfileConfigError(message)


@dataclass(frozen=True)
class RecorderSettings:
    """How each self-attention call is measured (the unit of sparsity matches the runtime's).

    block_size: tokens per block (64 or 128). tile: (t, h, w) permutation tile. sink: whether
    first-frame blocks are forced in both recall masks (as the runtime forces them). densities:
    the recall grid. attn_threshold: token s is high-attention if its mean received mass exceeds
    attn_threshold / S. map_steps: steps whose block-pooled maps are stored. tile_rows: query rows
    per tile of the exact computation (None: from a 1 GiB budget). attention_steps: the steps
    whose attention statistics are computed (None: every step); the exact statistics cost
    ~20x a forward, so long schedules at full size profile a few steps (step change is
    recorded at every step regardless). output_error: also measure sparse attention's output
    against dense per head and density, dropped blocks left out and estimated (table
    attention_error: the compiler charges sparse layers this error, and `--estimate-dropped
    measured` reads it; ~20% more time).
    """

    block_size: int = 128
    tile: tuple[int, int, int] = (1, 8, 8)
    sink: bool = True
    densities: tuple[float, ...] = DENSITY_GRID
    attn_threshold: float = 1.0
    map_steps: tuple[int, ...] = ()
    tile_rows: int | None = None
    attention_steps: tuple[int, ...] | None = None  # steps with attention statistics; None: all
    output_error: bool = False

    def __post_init__(self):
        if self.attention_steps is not None:
            steps = tuple(sorted({int(s) for s in self.attention_steps}))
            object.__setattr__(self, "attention_steps", steps)
            _require(bool(steps) and steps[0] >= 0,
                     f"attention steps must be non-negative step indices; got {steps}")
            off = [s for s in self.map_steps if s not in steps]
            _require(not off, f"map steps {off} are not attention steps {steps}: maps are "
                              "recorded with the attention statistics")
        object.__setattr__(self, "tile", tuple(self.tile))
        object.__setattr__(self, "densities", tuple(float(d) for d in self.densities))
        object.__setattr__(self, "map_steps", tuple(sorted({int(s) for s in self.map_steps})))
        _require(self.block_size in BLOCK_SIZES,
                 f"block size {self.block_size} is not supported; use one of {BLOCK_SIZES}")
        _require(len(self.tile) == 3 and all(isinstance(t, int) and t >= 1 for t in self.tile),
                 f"tile must be three positive ints (frames, height, width); got {self.tile}")
        _require(bool(self.densities) and all(0.0 < d <= 1.0 for d in self.densities),
                 f"densities must be in (0, 1]; got {self.densities}")
        _require(math.isfinite(self.attn_threshold) and self.attn_threshold > 0,
                 f"attention threshold must be a positive number; got {self.attn_threshold}")
        _require(all(s >= 0 for s in self.map_steps),
                 f"map steps must be non-negative step indices; got {self.map_steps}")
        _require(self.tile_rows is None or self.tile_rows >= 1,
                 f"tile_rows must be a positive int or None; got {self.tile_rows}")

    def to_metadata(self) -> dict:
        """The settings as the trace files record them (schema.REQUIRED_SETTINGS included)."""
        return {
            "block_size": self.block_size, "tile": list(self.tile), "sink": self.sink,
            "densities": list(self.densities), "attn_threshold": self.attn_threshold,
            "map_steps": list(self.map_steps), "diagonal": True,
            "attention_steps": None if self.attention_steps is None else list(self.attention_steps),
            "output_error": self.output_error,
        }


def default_sink(tile: tuple[int, int, int]) -> bool:
    """Whether the first-frame sink is forced when not asked either way: only for tiles one
    frame deep. A tile tf frames deep puts first-frame tokens into every block of its first
    tile-frame, so forcing them keeps tf / F of all block rows and columns dense (a quarter at
    32 frames and tf = 8), more than a density of 0.2 leaves to choose from."""
    return tile[0] == 1


@dataclass(frozen=True)
class ProfileConfig:
    """One `ditplan profile` run: model, workload, prompts x seeds, recorder settings, output.

    mode: "clip" profiles the reference model on its own noised reference clips (ground-truth
    foreground, teacher-forced trajectory); "sample" runs the real sampler from noise with the
    unsupervised foreground estimate; "auto" picks clip for the reference pipeline, else sample.
    sink None forces the first-frame sink only for a tile one frame deep (``default_sink``).
    map_steps None records maps at the first, middle and last step. frames None: DEFAULT_FRAMES
    for a video pipeline, 1 for an image pipeline (``for_pipeline`` settles it).
    """

    out: Path
    model: str = "reference"
    prompts: tuple[str, ...] = DEFAULT_PROMPTS
    seeds: tuple[int, ...] = (0,)
    steps: int = 32
    height: int = 48
    width: int = 48
    frames: int | None = None
    guidance_scale: float = 4.0
    device: str | None = None
    dtype: str | None = None
    mode: str = "auto"
    block_size: int = 128
    tile: tuple[int, int, int] = (1, 8, 8)
    sink: bool | None = None  # None: default_sink(tile), settled on construction
    densities: tuple[float, ...] = DENSITY_GRID
    attn_threshold: float = 1.0
    map_steps: tuple[int, ...] | None = None
    tile_rows: int | None = None
    attention_steps: tuple[int, ...] | None = None
    output_error: bool = False
    progress: bool = field(default=True, compare=False)

    def __post_init__(self):
        object.__setattr__(self, "out", Path(self.out))
        object.__setattr__(self, "prompts", tuple(self.prompts))
        object.__setattr__(self, "seeds", tuple(self.seeds))
        self._validate_workload()
        _require(self.mode in MODES, f"mode must be one of {MODES}; got {self.mode!r}")
        _require(self.dtype is None or self.dtype in DTYPES,
                 f"dtype must be one of {DTYPES}; got {self.dtype!r}")
        for name in ("map_steps", "attention_steps"):
            bad = [s for s in getattr(self, name) or () if not 0 <= s < self.steps]
            _require(not bad, f"{name.replace('_', ' ')} {bad} are outside 0..{self.steps - 1}")
        self.recorder_settings()  # validates block size, tile, densities, threshold
        if self.sink is None:  # settled here, so the manifest and resume check see a bool
            object.__setattr__(self, "sink", default_sink(self.tile))

    def _validate_workload(self) -> None:
        _require(bool(self.prompts) and all(isinstance(p, str) and p.strip()
                                            for p in self.prompts),
                 "give at least one non-empty prompt")
        _require(bool(self.seeds) and all(isinstance(s, int) and s >= 0 for s in self.seeds),
                 f"seeds must be non-negative ints; got {self.seeds}")
        _require(len(set(self.seeds)) == len(self.seeds), f"seeds repeat: {self.seeds}")
        for name in ("steps", "height", "width", "frames"):
            value = getattr(self, name)
            if name == "frames" and value is None:
                continue
            _require(isinstance(value, int) and value >= 1,
                     f"{name} must be a positive int; got {value!r}")
        _require(math.isfinite(self.guidance_scale) and self.guidance_scale >= 0,
                 f"guidance scale must be a non-negative number; got {self.guidance_scale}")

    def for_pipeline(self, call: PipelineCall) -> ProfileConfig:
        """A copy with the frames the pipeline generates (ValueError for frames on an image
        pipeline)."""
        return replace(self, frames=call.frames(self.frames, DEFAULT_FRAMES))

    def recorder_settings(self) -> RecorderSettings:
        """The recorder's settings, with map steps defaulting to the first, middle and last
        (attention) step."""
        map_steps = self.map_steps
        if map_steps is None:
            steps = sorted(self.attention_steps or range(self.steps))
            map_steps = (steps[0], steps[len(steps) // 2], steps[-1])
        return RecorderSettings(
            block_size=self.block_size, tile=self.tile, sink=self.sink, densities=self.densities,
            attn_threshold=self.attn_threshold, map_steps=map_steps, tile_rows=self.tile_rows,
            attention_steps=self.attention_steps, output_error=self.output_error,
        )

    def resolved(self) -> ProfileConfig:
        """A copy with device (cuda when available) and dtype (float32 on CPU) filled in."""
        import torch

        device = self.device or ("cuda" if torch.cuda.is_available() else "cpu")
        is_cpu = torch.device(device).type == "cpu"
        dtype = self.dtype or ("float32" if is_cpu else "bfloat16")
        return replace(self, device=device, dtype=dtype)

    def identity(self) -> dict:
        """What makes two runs the same run (the resume check): everything but out/progress."""
        ident = asdict(self.resolved())
        for key in ("out", "progress", "tile_rows"):
            ident.pop(key)
        settings = self.recorder_settings()  # map and attention steps as it normalizes them
        ident["map_steps"] = list(settings.map_steps)
        ident["attention_steps"] = (None if settings.attention_steps is None
                                    else list(settings.attention_steps))
        return {k: list(v) if isinstance(v, tuple) else v for k, v in ident.items()}
