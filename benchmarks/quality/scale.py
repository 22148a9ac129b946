"""Speed at scale: the same methods on the Wan2.1-1.3B-shaped transformer (random weights,
480p x 81 frames), a few denoising steps with CFG, timed against dense in the same run.

Quality is not measured here (random weights). Plans compiled on the reference model are mapped
onto the 30 layers and the step count by relative position (transfer.py).
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from benchmarks.common import time_ms
from benchmarks.forward import build
from benchmarks.quality.catalog import build_methods, select_methods
from benchmarks.quality.harness import QualityConfig, catalog_context
from benchmarks.quality.methods import Method, method_row
from benchmarks.quality.results import SCALE_FILE, ResultStore, environment
from benchmarks.quality.transfer import transfer_plan
from ditplan.runtime.loading import load_pipeline

logger = logging.getLogger(__name__)

SCALES = ("wan1.3b",)
WAN_SHIFT = 3.0  # Wan2.1's sampling shift at 480p
WAN_GUIDANCE = 5.0  # Wan2.1's default CFG scale


@dataclass(frozen=True)
class ScaleConfig:
    """The speed-at-scale run; ``quality`` names the reference-model run whose plans it maps."""

    quality: QualityConfig
    scale: str = "wan1.3b"
    steps: int = 8
    repeats: int = 1

    def run_key(self) -> str:
        return f"{self.scale}|{self.steps}|{self.quality.quick}|{self.quality.run_key()}"


class Denoiser:
    """``steps`` Euler steps with CFG on fixed random latents and text, transformer calls only."""

    def __init__(self, model, inputs: dict, steps: int):
        self.model, self.inputs = model, inputs
        scheduler = FlowMatchEulerDiscreteScheduler(shift=WAN_SHIFT)
        scheduler.set_timesteps(steps, device="cpu")
        self.timesteps = [float(t) for t in scheduler.timesteps]
        self.sigmas = [float(s) for s in scheduler.sigmas]
        text = inputs["encoder_hidden_states"]  # [1, L, text_dim]
        self.text = {"cond": text, "uncond": torch.randn_like(text)}

    @torch.no_grad()
    def __call__(self) -> torch.Tensor:
        x = self.inputs["hidden_states"]  # [1, C, F, H, W]
        steps = len(self.timesteps)
        for i, t in enumerate(self.timesteps):
            out = {}
            for context in ("cond", "uncond"):
                with self.model.cache_context(context, step_index=i, num_inference_steps=steps):
                    out[context] = self.model(
                        hidden_states=x, timestep=torch.tensor([t], device=x.device),
                        encoder_hidden_states=self.text[context], return_dict=False)[0]
            velocity = out["uncond"] + WAN_GUIDANCE * (out["cond"] - out["uncond"])
            x = x + (self.sigmas[i + 1] - self.sigmas[i]) * velocity
        self.model._reset_stateful_cache()  # a generation ended, as pipelines do
        return x


def time_method(method: Method, denoise: Denoiser, dense_ms: float, repeats: int) -> dict:
    """One method's scale row: install on the big model, warm up, time, undo."""

    def measure_speed(installed) -> dict:
        ms = time_ms(denoise, warmup=1, repeats=repeats)
        return dict(dense_ms=dense_ms, method_ms=ms, speedup=dense_ms / ms,
                    stats=installed.stats())

    return method_row(method, denoise.model, measure_speed, where=" at scale")


def run_scale(config: ScaleConfig) -> list[dict]:
    """Time dense and every method at scale; rows go to ``out/scale.jsonl``."""
    quality = config.quality
    device = quality.device
    pipe = load_pipeline(quality.model, device=device)
    pipe.set_progress_bar_config(disable=True)
    dtype = torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    model, inputs = build(quality.quick, device, dtype)
    denoise = Denoiser(model, inputs, config.steps)
    latents_shape = tuple(inputs["hidden_states"].shape)
    adapt = functools.partial(_adapt, steps=config.steps, latents_shape=latents_shape)
    ctx = catalog_context(pipe, quality, steps=config.steps, dtype=dtype,
                          timesteps=denoise.timesteps, adapt=adapt)
    methods = select_methods(build_methods(ctx, quality.quick), quality.methods)
    store = ResultStore(quality.out / SCALE_FILE, config.run_key())
    base = {"kind": "scale", "scale": config.scale, "steps": config.steps,
            "latents_shape": list(latents_shape), **environment(device, quality.command)}
    dense_ms = time_ms(denoise, warmup=1, repeats=config.repeats)
    store.add({**base, "family": "dense", "setting": "baseline", "method": "dense/baseline",
               "status": "ok", "dense_ms": dense_ms, "method_ms": dense_ms, "speedup": 1.0})
    for method in methods:
        if not store.done(method.name):
            logger.info("%s at scale ...", method.name)
            store.add({**base, **time_method(method, denoise, dense_ms, config.repeats)})
    return store.current()


def _adapt(plan, transformer, *, steps: int, latents_shape: tuple[int, ...]):
    return transfer_plan(plan, transformer, steps=steps, latents_shape=latents_shape,
                         guidance_scale=WAN_GUIDANCE)
