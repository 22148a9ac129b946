"""cache-dit's DBCache (F1B0, with and without its TaylorSeer calibrator) as benchmark methods."""

from __future__ import annotations

import importlib
import math
from dataclasses import replace

from diffusers.hooks import HookRegistry, ModelHook

from benchmarks.quality.methods import Installed, Method, NotApplicable, transformer_of

CACHE_DIT_VERSION = "1.5.3"  # pinned in pyproject's `bench` extra; checked with diffusers 0.42.1
MISSING = f"cache-dit is not installed: pip install cache-dit=={CACHE_DIT_VERSION}"
AT_SCALE = "its skip decisions depend on the model's outputs, which random weights make meaningless"
REFRESH_HOOK = "benchmark_cache_dit_refresh"
# cache-dit's published F1B0 settings (FLUX.1, 28-50 steps) warm up 4 steps and cache at most
# 4-6 steps in a row; the warm-up is scaled to the step count as for diffusers' TaylorSeer.
WARMUP_FRACTION = 0.1
MAX_CONTINUOUS_CACHED = 4
TAYLORSEER_ORDER = 1
FIRST_BLOCKS = 1  # F1B0: the first block always computes, no last blocks do


def cachedit_methods(ctx, thresholds) -> list[Method]:
    """DBCache F1B0 at each residual-diff threshold, without and then with TaylorSeer.

    Args:
        ctx: the catalog's CatalogContext (steps; ``adapt`` is set for the speed-at-scale run).
        thresholds: residual_diff_threshold values, e.g. (0.08, 0.12, 0.24).
    """
    warmup = max(1, math.ceil(WARMUP_FRACTION * ctx.steps))
    methods = [dbcache(t, steps=ctx.steps, warmup=warmup, taylorseer=taylor)
               for taylor in (False, True) for t in thresholds]
    if ctx.adapt is not None:
        return [replace(m, install=_refuse(AT_SCALE)) for m in methods]
    return methods


def dbcache(threshold: float, *, steps: int, warmup: int, taylorseer: bool) -> Method:
    """DBCache with the first block computed (F1B0): while its residual changes by less than
    ``threshold`` (relative L1) the other blocks' residual is reused, or forecast by TaylorSeer.
    CFG branches keep separate caches (the reference pipeline calls cond, then uncond)."""
    params = dict(Fn_compute_blocks=FIRST_BLOCKS, Bn_compute_blocks=0,
                  residual_diff_threshold=threshold, max_warmup_steps=warmup,
                  max_continuous_cached_steps=MAX_CONTINUOUS_CACHED, enable_separate_cfg=True,
                  num_inference_steps=steps)

    def install(pipe) -> Installed:
        cache_dit = _import_cache_dit()
        transformer = transformer_of(pipe)
        calibrator = (cache_dit.TaylorSeerCalibratorConfig(taylorseer_order=TAYLORSEER_ORDER)
                      if taylorseer else None)
        cache_dit.enable_cache(transformer, cache_config=cache_dit.DBCacheConfig(**params),
                               calibrator_config=calibrator)
        registry = HookRegistry.check_if_exists_or_initialize(transformer)
        registry.register_hook(_RefreshContext(cache_dit.refresh_context, steps), REFRESH_HOOK)

        def undo() -> None:
            registry.remove_hook(REFRESH_HOOK)
            cache_dit.disable_cache(transformer)

        def stats() -> dict:
            summary = cache_dit.summary(transformer, logging=False)[-1]
            return hit_stats(summary, len(transformer.blocks))

        return Installed(undo=undo, stats=stats)

    family = "cache-dit-taylorseer" if taylorseer else "cache-dit"
    recorded = {**params, "taylorseer_order": TAYLORSEER_ORDER if taylorseer else None,
                "cache_dit": CACHE_DIT_VERSION}
    return Method(family, f"t={threshold:g}", install, recorded,
                  notes="DBCache F1B0 on the bare transformer; context refreshed per generation")


class _RefreshContext(ModelHook):
    """Refreshes cache-dit's persistent context when diffusers resets stateful hooks, which the
    pipelines do at the end of every generation: each generation starts with a fresh cache."""

    _is_stateful = True

    def __init__(self, refresh, steps: int):
        super().__init__()
        self.refresh, self.steps = refresh, steps

    def reset_state(self, module):
        self.refresh(module, num_inference_steps=self.steps)
        return module


def hit_stats(summary, num_blocks: int) -> dict:
    """The last generation's cache hits, from ``cache_dit.summary(transformer)[-1]``: the steps
    whose blocks after the first were reused or forecast (cond, uncond), and the shares of
    transformer calls and of block evaluations that were skipped."""
    calls = summary.accumulated_transformer_executed_steps
    cached = summary.accumulated_cached_steps + summary.cfg_accumulated_cached_steps
    return {"cached_steps": list(summary.cached_steps),
            "cfg_cached_steps": list(summary.cfg_cached_steps),
            "cached_calls_share": cached / calls if calls else 0.0,
            "blocks_skipped_share": cached * (num_blocks - FIRST_BLOCKS) / (calls * num_blocks)
            if calls else 0.0}


def _import_cache_dit():
    try:
        return importlib.import_module("cache_dit")
    except ImportError as error:
        raise NotApplicable(MISSING) from error


def _refuse(reason: str):
    def install(pipe):
        raise NotApplicable(reason)

    return install
