"""diffusers' built-in caches as methods, with MagCache calibrated on the model first.

All five run on ``WanTransformer3DModel`` with separate cond/uncond calls (checked on the SMOKE
reference model, diffusers 0.42.1). Notes recorded with the rows:
- TaylorSeer's default module patterns (``^blocks.*attn``, matched with ``re.fullmatch``) match
  none of Wan's modules (``blocks.0.attn1``), so it would silently do nothing; the blocks are
  named explicitly (``blocks\\.\\d+``).
- FasterCache's unconditional-branch reuse needs CFG batched into one call; with separate calls
  it raises IndexError, so it runs with ``is_guidance_distilled=True`` (attention reuse only).
- PyramidAttentionBroadcast and FasterCache need the current timestep; the reference pipeline
  does not expose one, so a callback reads it from ditplan's step tracker.
"""

from __future__ import annotations

import ast
import contextlib
import copy
import io
import logging

import torch
from diffusers import (
    FasterCacheConfig,
    FirstBlockCacheConfig,
    MagCacheConfig,
    PyramidAttentionBroadcastConfig,
    TaylorSeerCacheConfig,
)

from benchmarks.quality.methods import Installed, Method, transformer_of
from ditplan.runtime.context import install_step_tracker, remove_step_tracker

MAG_LOGGER = "diffusers.hooks.mag_cache"
_MAG_PREFIX = "MagCache Calibration Results:"
FASTER_NOTE = ("uncond-branch reuse needs batched CFG (IndexError with separate calls): "
               "run with is_guidance_distilled=True, attention reuse only")
TAYLOR_NOTE = "default module patterns match nothing in Wan; hooked blocks\\.\\d+ explicitly"


def scheduler_timesteps(scheduler, steps: int) -> list[float]:
    """The scheduler's timesteps for ``steps`` steps, as host floats (no device sync later)."""
    scheduler = copy.deepcopy(scheduler)
    scheduler.set_timesteps(steps, device="cpu")
    return [float(t) for t in scheduler.timesteps]


def cache_method(family: str, setting: str, make_config, *, steps: int,
                 timesteps: list[float], params: dict, notes: str = "") -> Method:
    """A diffusers cache: ``make_config(current_timestep_callback)`` gives its config."""

    def install(pipe) -> Installed:
        transformer = transformer_of(pipe)
        tracker = install_step_tracker(transformer, steps)

        def current_timestep() -> float:
            return timesteps[min(tracker.state.step, len(timesteps) - 1)]

        transformer.enable_cache(make_config(current_timestep))

        def undo() -> None:
            transformer.disable_cache()
            remove_step_tracker(transformer)

        return Installed(undo=undo)

    return Method(family, setting, install, params, notes)


def first_block_cache(threshold: float, **common) -> Method:
    """FirstBlockCache: skip the other blocks while the first block's residual barely changes."""
    return cache_method("diffusers-fbc", f"t={threshold:g}",
                        lambda clock: FirstBlockCacheConfig(threshold=threshold),
                        params=dict(threshold=threshold), **common)


def pyramid_attention_broadcast(skip_range: int, **common) -> Method:
    """PAB: reuse self-attention outputs for ``skip_range - 1`` of every ``skip_range`` calls."""
    def make(clock):
        return PyramidAttentionBroadcastConfig(
            spatial_attention_block_skip_range=skip_range,
            spatial_attention_timestep_skip_range=(100, 800), current_timestep_callback=clock)

    return cache_method("diffusers-pab", f"skip={skip_range}", make,
                        params=dict(spatial_skip_range=skip_range, timestep_range=[100, 800]),
                        **common)


def faster_cache(skip_range: int, **common) -> Method:
    """FasterCache's attention reuse (its CFG-branch reuse cannot run here, see FASTER_NOTE)."""
    def make(clock):
        return FasterCacheConfig(
            spatial_attention_block_skip_range=skip_range,
            spatial_attention_timestep_skip_range=(-1, 681), current_timestep_callback=clock,
            attention_weight_callback=lambda _: 0.3, is_guidance_distilled=True)

    return cache_method("diffusers-fastercache", f"skip={skip_range}", make,
                        params=dict(spatial_skip_range=skip_range, timestep_range=[-1, 681],
                                    attention_weight=0.3), notes=FASTER_NOTE, **common)


def taylorseer(interval: int, *, warmup: int, dtype: torch.dtype, name_warmup: bool = False,
               **common) -> Method:
    """TaylorSeer: first-order forecast of every block's output between full steps (the name
    states the warm-up when ``name_warmup``: settings beside the default warm-up)."""
    def make(clock):
        return TaylorSeerCacheConfig(cache_interval=interval, disable_cache_before_step=warmup,
                                     max_order=1, taylor_factors_dtype=dtype,
                                     cache_identifiers=[r"blocks\.\d+"])

    setting = f"interval={interval}" + (f",warmup={warmup}" if name_warmup else "")
    return cache_method("diffusers-taylorseer", setting, make,
                        params=dict(cache_interval=interval, disable_cache_before_step=warmup,
                                    max_order=1), notes=TAYLOR_NOTE, **common)


def mag_cache(threshold: float, *, ratios: list[float], **common) -> Method:
    """MagCache with magnitude ratios calibrated on this model (see calibrate_mag_cache)."""
    steps = common["steps"]

    def make(clock):
        return MagCacheConfig(threshold=threshold, max_skip_steps=3, retention_ratio=0.2,
                              num_inference_steps=steps, mag_ratios=list(ratios))

    return cache_method("diffusers-magcache", f"t={threshold:g}", make,
                        params=dict(threshold=threshold, max_skip_steps=3, retention_ratio=0.2,
                                    calibrated_ratios=[round(r, 5) for r in ratios]), **common)


class _Capture(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.ratios: list[list[float]] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if message.startswith(_MAG_PREFIX):
            self.ratios.append(ast.literal_eval(message[len(_MAG_PREFIX):].strip()))


def calibrate_mag_cache(pipe, generate, steps: int) -> list[float]:
    """MagCache's own calibration (``calibrate=True``, one run), averaged over CFG branches.

    Args:
        pipe: the pipeline; ``generate()`` runs it once at the benchmark workload.
        steps: denoising steps of that workload.

    Returns:
        [steps] magnitude ratios.
    """
    logger = logging.getLogger(MAG_LOGGER)
    capture, level, propagate = _Capture(), logger.level, logger.propagate
    logger.addHandler(capture)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    pipe.transformer.enable_cache(MagCacheConfig(calibrate=True, num_inference_steps=steps))
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # it also prints the ratios
            generate()
    finally:
        pipe.transformer.disable_cache()
        logger.removeHandler(capture)
        logger.setLevel(level)
        logger.propagate = propagate
    if not capture.ratios:
        raise RuntimeError("MagCache calibration logged no ratios; diffusers' MagCache changed")
    return [sum(column) / len(column) for column in zip(*capture.ratios, strict=True)]
