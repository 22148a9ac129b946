"""Every method and setting the benchmark runs, full grid or the ``--quick`` subset."""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from benchmarks.quality import caches
from benchmarks.quality.cachedit import cachedit_methods
from benchmarks.quality.methods import (
    RAINFUSION_DENSE_FRACTION,
    Method,
    NotApplicable,
    dense_repeat,
    rainfusion,
)
from benchmarks.quality.plans import (
    calibrated_method,
    plan_method,
    profilingdit_overrides,
    r_attn_roles,
)
from benchmarks.quality.window import static_window

FULL_GRID = dict(
    presets=("high", "balanced", "fast"), targets=(1.5, 2.0, 3.0),
    # 3.5x too, so that ditplan's measured curve spans 3x (a 3x plan runs 3.00 +- 1%)
    calibrated=(1.5, 2.0, 3.0, 3.5), candidates=12, refine=(2, 4),  # (rounds, per round)
    cachedit=(0.08, 0.12, 0.24, 0.4),
    ablation_presets=("balanced", "fast"), densities=(0.5, 0.2, 0.1), intervals=(2, 4, 6),
    # the largest settings reach 3x and more, so every family has a point beyond 3x
    fbc=(0.05, 0.1, 0.2, 0.3, 0.4), pab=(2, 3, 4), faster=(2, 3, 4), taylor=(2, 3, 5, 6, 8),
    taylor_long_warmup=((2, 0.25), (2, 0.35)),  # (interval, warm-up share): points near 1.5x
    mag=(0.03, 0.06, 0.12, 0.24),  # max_skip_steps=3 and 20% retention cap it near 2.4x
)
QUICK_GRID = dict(
    presets=("balanced", "fast"), targets=(1.5,), calibrated=(1.5,), candidates=2, refine=(0, 1),
    cachedit=(0.24,),
    ablation_presets=("fast",), densities=(0.2,),
    intervals=(2,), fbc=(0.1,), pab=(2,), faster=(2,), taylor=(2,), taylor_long_warmup=(),
    mag=(0.06,),
)
FBC_AT_SCALE = ("its skip decisions depend on the model's outputs, which random weights make "
                "meaningless")


@dataclass(frozen=True)
class CatalogContext:
    """What building the methods needs; ``trace_dir`` profiles on first call."""

    steps: int
    block_size: int
    tile: tuple[int, int, int]
    backend: str
    dtype: torch.dtype
    timesteps: list[float]
    mag_ratios: list[float]
    trace_dir: Callable[[], Path]
    calibrator: Callable  # pipe -> Calibrator measuring candidate plans on calibration prompts
    plans_dir: Path  # calibrated plans are saved here (the scale run maps them)
    adapt: Callable | None = None  # plan -> plan for another model (speed at scale)


def build_methods(ctx: CatalogContext, quick: bool) -> list[Method]:
    """dense repeat, ditplan presets, diffusers' caches, published baselines, then ditplan's
    speed targets and ablations (the order a time-limited, resumable run covers them in)."""
    grid = QUICK_GRID if quick else FULL_GRID
    return [dense_repeat(), *calibrated_methods(ctx, grid), *_ditplan_presets(ctx, grid),
            *_diffusers(ctx, grid), *cachedit_methods(ctx, grid["cachedit"]),
            *_published(ctx, grid), *_ditplan_variants(ctx, grid)]


def calibrated_methods(ctx: CatalogContext, grid: dict, family: str = "ditplan-calibrated",
                       forced: dict | None = None) -> list[Method]:
    """``compile-policy --target-speedup T --calibrate`` at each of the grid's calibrated
    targets (its candidates and refine rounds), with ``forced`` compiler settings."""
    return [calibrated_method(t, ctx.trace_dir, calibrator=ctx.calibrator,
                              plans_dir=ctx.plans_dir, backend=ctx.backend,
                              candidates=grid["candidates"], refine=grid["refine"],
                              adapt=ctx.adapt, family=family, forced=forced)
            for t in grid["calibrated"]]


class UnknownMethodError(ValueError):
    """A --methods pattern that names no method of the catalog."""


def select_methods(methods: list[Method], patterns: tuple[str, ...]) -> list[Method]:
    """The methods whose names match any pattern (fnmatch, e.g. ``diffusers-magcache/*``);
    all when there are none. A pattern that matches no method raises UnknownMethodError."""
    if not patterns:
        return methods
    unmatched = [p for p in patterns if not any(fnmatch.fnmatchcase(m.name, p) for m in methods)]
    if unmatched:
        names = ", ".join(m.name for m in methods)
        raise UnknownMethodError(f"--methods {' '.join(unmatched)} matches no method; the "
                                 f"catalog has: {names}")
    return [m for m in methods if any(fnmatch.fnmatchcase(m.name, p) for p in patterns)]


def _ditplan_presets(ctx: CatalogContext, grid: dict) -> list[Method]:
    common = dict(backend=ctx.backend, adapt=ctx.adapt)
    return [plan_method("ditplan", p, ctx.trace_dir, p, **common) for p in grid["presets"]]


def _ditplan_variants(ctx: CatalogContext, grid: dict) -> list[Method]:
    common = dict(backend=ctx.backend, adapt=ctx.adapt)
    methods = [plan_method("ditplan", f"target={t:g}x", ctx.trace_dir, "balanced",
                            overrides=lambda t=t: dict(target_speedup=t),
                            params=dict(target_speedup=t), **common) for t in grid["targets"]]
    for p in grid["ablation_presets"]:
        methods.append(plan_method("ditplan-sparse-only", p, ctx.trace_dir, p,
                                   overrides=lambda: dict(caching=False), **common))
        methods.append(plan_method("ditplan-cache-only", p, ctx.trace_dir, p,
                                   overrides=lambda: dict(fixed_density=1.0), **common))
    return methods


def _published(ctx: CatalogContext, grid: dict) -> list[Method]:
    sparse = dict(steps=ctx.steps, block_size=ctx.block_size, tile=ctx.tile, backend=ctx.backend)
    methods = [rainfusion(d, steps=ctx.steps, block_size=ctx.block_size, backend=ctx.backend)
               for d in grid["densities"]]
    methods += [static_window(d, dense_fraction=RAINFUSION_DENSE_FRACTION, **sparse)
                for d in grid["densities"]]
    for interval in grid["intervals"]:
        methods.append(plan_method(
            "profilingdit", f"interval={interval}", ctx.trace_dir, "balanced",
            overrides=lambda i=interval: profilingdit_overrides(r_attn_roles(ctx.trace_dir()), i),
            backend=ctx.backend, adapt=ctx.adapt, params=dict(interval=interval),
            notes="roles: R_attn >= median is foreground (tau unpublished)"))
    return methods


def _diffusers(ctx: CatalogContext, grid: dict) -> list[Method]:
    common = dict(steps=ctx.steps, timesteps=ctx.timesteps)
    warmup = max(1, math.ceil(0.1 * ctx.steps))
    methods = [caches.first_block_cache(t, **common) for t in grid["fbc"]]
    if ctx.adapt is not None:
        methods = [_not_applicable(m, FBC_AT_SCALE) for m in methods]
    methods += [caches.pyramid_attention_broadcast(s, **common) for s in grid["pab"]]
    methods += [caches.faster_cache(s, **common) for s in grid["faster"]]
    methods += [caches.taylorseer(i, warmup=warmup, dtype=ctx.dtype, **common)
                for i in grid["taylor"]]
    methods += [caches.taylorseer(i, warmup=math.ceil(share * ctx.steps), dtype=ctx.dtype,
                                  name_warmup=True, **common)
                for i, share in grid["taylor_long_warmup"]]
    methods += [caches.mag_cache(t, ratios=ctx.mag_ratios, **common) for t in grid["mag"]]
    return methods


def _not_applicable(method: Method, reason: str) -> Method:
    def install(pipe):
        raise NotApplicable(reason)

    return replace(method, install=install)
