"""The long workload's methods (issue 15 part 3), full grid or the ``--quick`` subset."""

from __future__ import annotations

import functools

from benchmarks.quality.catalog import CatalogContext, calibrated_methods
from benchmarks.quality.goals import CACHE_ONLY_CALIBRATED, CACHING_ONLY
from benchmarks.quality.methods import RAINFUSION_DENSITY, Method, dense_repeat, rainfusion
from benchmarks.quality.plans import plan_method
from benchmarks.quality.sparse_layers import (
    choose_layers,
    estimated_suffix,
    every_layer,
    sparse_layers_method,
)

LONG_GRID = dict(
    densities=(0.5, 0.2, 0.1),  # sparse attention alone: in the layers the compiler chooses,
    # and in every layer (the compiler may choose none)
    # ditplan plans with sparse attention + caching, and the same without sparse attention: two
    # curves over about 1.3-4x, dense enough to compare them at equal PSNR
    presets=("high", "balanced", "fast"), targets=(1.5, 2.0, 2.5, 3.0, 3.5, 4.0),
    # targets calibrated (the best of 8 candidates measured on training captions, and of a
    # second round closer to the target; no refine rounds: each candidate costs ~12 s on an
    # H200), with and without sparse attention: the best plans each finds; up to 5x, where
    # sparse attention after the caching warm-up pays most (BENCHMARKS.md, session 22)
    calibrated=(2.5, 3.0, 3.5, 4.0, 5.0), candidates=8, refine=(0, 1),
    # the same presets with mixed heads: diffuse heads dense beside sparse ones
    mixed_presets=("high", "balanced", "fast"),
    # the dropped key blocks estimated from block means: sparse attention alone in every layer
    # (heads chosen by the profiled output error, and every head), and the plans with sparse
    # attention (plain and mixed heads; measured heads, and every head: suffix -all)
    estimated_presets=("fast",), estimated_mixed_presets=("balanced", "fast"),
)
LONG_QUICK_GRID = dict(densities=(0.2,), presets=("fast",), targets=(1.5,), calibrated=(),
                       candidates=2, refine=(0, 1),
                       mixed_presets=("fast",), estimated_presets=("fast",),
                       estimated_mixed_presets=())
MIXED = {"mixed_heads": True}
CACHE_ONLY = {"fixed_density": 1.0}
MIXED_FAMILY = "ditplan-mixed-heads"
ESTIMATE_MODES = ("measured", "all")  # CompilerConfig.estimate_dropped of the -estimated rows


def build_long_methods(ctx: CatalogContext, quick: bool) -> list[Method]:
    """dense repeat, sparse attention alone at each density (the compiler's layers, then every
    layer), RainFusion2.0 as published, then ditplan's plans with sparse attention and caching,
    then with caching only, then the presets with mixed heads (with caching, and balanced
    without: sparse attention alone where each head needs it), then the rows whose sparse layers
    estimate their dropped key blocks (suffix ``-estimated``: in the heads the profile chose;
    ``-estimated-all``: in every sparse head)."""
    grid = LONG_QUICK_GRID if quick else LONG_GRID
    choice = functools.cache(lambda: choose_layers(ctx.trace_dir()))
    every = functools.cache(lambda: every_layer(choice()))  # the same compile's blocks
    sparse = [sparse_layers_method(d, ctx.trace_dir, choice, backend=ctx.backend)
              for d in grid["densities"]]
    sparse += [sparse_layers_method(d, ctx.trace_dir, every, backend=ctx.backend, every=True)
               for d in grid["densities"]]
    estimated = [sparse_layers_method(d, ctx.trace_dir, every, backend=ctx.backend, every=True,
                                      estimate_dropped=mode)
                 for mode in ESTIMATE_MODES for d in grid["densities"]]
    published = rainfusion(RAINFUSION_DENSITY, steps=ctx.steps, block_size=ctx.block_size,
                           backend=ctx.backend)
    return [dense_repeat(), *sparse, published,
            *_plans(ctx, "ditplan", {}, grid["presets"], grid["targets"]),
            *_plans(ctx, CACHING_ONLY, CACHE_ONLY, grid["presets"],
                    grid["targets"]),
            *calibrated_methods(ctx, grid, CACHE_ONLY_CALIBRATED, CACHE_ONLY),
            *calibrated_methods(ctx, grid),
            *_plans(ctx, MIXED_FAMILY, MIXED, grid["mixed_presets"]),
            *_plans(ctx, f"{MIXED_FAMILY}-sparse-only", {**MIXED, "caching": False},
                    ("balanced",)),
            *estimated,
            *(plan for mode in ESTIMATE_MODES for plan in _estimated_plans(ctx, grid, mode))]


def _estimated_plans(ctx: CatalogContext, grid: dict, mode: str) -> list[Method]:
    """The plain and mixed-heads plans compiled with ``estimate_dropped=mode``."""
    forced = {"estimate_dropped": mode}
    suffix = estimated_suffix(mode)
    return [*_plans(ctx, "ditplan" + suffix, forced, grid["estimated_presets"]),
            *_plans(ctx, MIXED_FAMILY + suffix, {**MIXED, **forced},
                    grid["estimated_mixed_presets"])]


def _plans(ctx: CatalogContext, family: str, forced: dict, presets: tuple[str, ...],
           targets: tuple[float, ...] = ()) -> list[Method]:
    """The presets, then the speed targets (compiled from "balanced"), with ``forced``
    compiler settings."""
    common = dict(backend=ctx.backend, adapt=ctx.adapt)
    methods = [plan_method(family, p, ctx.trace_dir, p, overrides=lambda: dict(forced),
                           params=dict(forced), **common) for p in presets]
    methods += [plan_method(family, f"target={t:g}x", ctx.trace_dir, "balanced",
                            overrides=lambda t=t: {**forced, "target_speedup": t},
                            params=dict(target_speedup=t, **forced), **common)
                for t in targets]
    return methods
