"""How a pipeline is called for a workload: frames for video only, guidance and CFG as it runs."""

from __future__ import annotations

import inspect
import itertools
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

# Guidance kinds. "cfg": guidance_scale > 1 runs classifier-free guidance (Wan, the reference
# model). "embedded": a guidance-distilled transformer takes the scale as an input, one call per
# step (FLUX.1-dev). "true_cfg": the scale is true_cfg_scale with a negative prompt, two calls
# per step when > 1 (Qwen-Image, FLUX.1 without guidance embeddings). "guider": the pipeline takes
# no guidance argument; its diffusers guider component (ClassifierFreeGuidance) runs CFG at its
# guidance_scale, two calls per step unless it is 1 (HunyuanVideo-1.5).
CFG, EMBEDDED, TRUE_CFG, GUIDER = "cfg", "embedded", "true_cfg", "guider"
GUIDANCE_HELP = ("Wan, the reference model: classifier-free guidance when > 1 (two transformer "
                 "calls per step); FLUX.1-dev, HunyuanVideo (guidance embeddings): the embedded "
                 "guidance, one call per step; Qwen-Image, FLUX.1 without guidance embeddings: "
                 "true CFG (true_cfg_scale, a blank negative prompt) when > 1; HunyuanVideo-1.5: "
                 "its guider's guidance scale (CFG unless 1)")
# The negative prompt of a true-CFG generation (Qwen-Image's own examples pass one space).
NEGATIVE_PROMPT = " "


@dataclass(frozen=True)
class PipelineCall:
    """What a pipeline's ``__call__`` takes: ``video`` (``num_frames``; else it makes images),
    its guidance kind and ``step_callbacks`` (``callback_on_step_end``). ``name`` is the
    pipeline class, for messages."""

    name: str
    video: bool
    guidance: str
    step_callbacks: bool = True

    @classmethod
    def of(cls, pipe) -> PipelineCall:
        """Read from the pipeline's signature, its guider and its transformer's
        ``guidance_embeds``."""
        parameters = inspect.signature(pipe.__call__).parameters
        if "guidance_scale" not in parameters and getattr(pipe, "guider", None) is not None:
            guidance = GUIDER
        elif "true_cfg_scale" not in parameters:
            guidance = CFG
        elif pipe.transformer.config.get("guidance_embeds", False):
            guidance = EMBEDDED
        else:
            guidance = TRUE_CFG
        return cls(type(pipe).__name__, "num_frames" in parameters, guidance,
                   "callback_on_step_end" in parameters)

    def cfg(self, guidance_scale: float) -> bool:
        """Whether a generation at ``guidance_scale`` runs the transformer twice per step
        (cond and uncond contexts)."""
        if self.guidance == GUIDER:
            return not math.isclose(guidance_scale, 1.0)
        return self.guidance != EMBEDDED and guidance_scale > 1.0

    def frames(self, frames: int | None, default: int | None = None) -> int | None:
        """The frames to generate: ``frames`` (else ``default``) for video, 1 for images;
        ValueError for a frame count on an image pipeline."""
        if self.video:
            return default if frames is None else frames
        if frames not in (None, 1):
            raise ValueError(f"{self.name} generates images: --frames {frames} does not apply "
                             "(leave it out)")
        return 1

    def arguments(self, prompt: str | list[str], *, steps: int, height: int, width: int,
                  frames: int, guidance_scale: float) -> dict:
        """The keyword arguments of one generation of ``prompt`` (one or a batch), for
        :meth:`invoke` (a guider pipeline's ``guidance_scale`` goes to its guider)."""
        call = dict(prompt=prompt, num_inference_steps=steps, height=height, width=width)
        if self.video:
            call["num_frames"] = frames
        else:
            self.frames(frames)
        if self.guidance == TRUE_CFG:
            call["true_cfg_scale"] = guidance_scale
            if self.cfg(guidance_scale):
                call["negative_prompt"] = (NEGATIVE_PROMPT if isinstance(prompt, str)
                                           else [NEGATIVE_PROMPT] * len(prompt))
        else:
            call["guidance_scale"] = guidance_scale
        if self.guidance == EMBEDDED:
            call["true_cfg_scale"] = 1.0  # no true CFG (QwenImagePipeline's default is 4.0)
        return call

    def invoke(self, pipe, arguments: dict, on_step_end: Callable | None = None, **extra):
        """``pipe(**arguments, **extra)``: a guider pipeline's guider runs at the arguments'
        ``guidance_scale`` for this call, and ``on_step_end(pipe, step, timestep, tensors)``
        is called after every denoising step (through ``callback_on_step_end``, which may
        replace ``latents``; a pipeline without it gets the call after its scheduler's step,
        with no tensors, and must not replace any)."""
        arguments = dict(arguments)
        guidance_scale = arguments.pop("guidance_scale") if self.guidance == GUIDER else None
        if on_step_end is not None and self.step_callbacks:
            extra.update(callback_on_step_end=on_step_end,
                         callback_on_step_end_tensor_inputs=["latents"])
        with _guided(pipe, guidance_scale), _after_scheduler_steps(
                pipe, None if self.step_callbacks else on_step_end, self.name):
            return pipe(**arguments, **extra)

    def samples(self, output) -> np.ndarray:
        """A generation's samples as frames: float [N, F, H, W, 3] (F = 1 for an image)."""
        if self.video:
            return np.asarray(output.frames)
        return np.asarray(output.images)[:, None]


@contextmanager
def _guided(pipe, guidance_scale: float | None) -> Iterator[None]:
    """The pipeline's guider replaced by a copy at ``guidance_scale`` (None: left alone)."""
    if guidance_scale is None:
        yield
        return
    guider = pipe.guider
    pipe.guider = guider.new(guidance_scale=guidance_scale)
    try:
        yield
    finally:
        pipe.guider = guider


@contextmanager
def _after_scheduler_steps(pipe, on_step_end: Callable | None, name: str) -> Iterator[None]:
    """``on_step_end(pipe, step, timestep, {})`` after each call of the pipeline's
    ``scheduler.step`` (once per denoising step); None: nothing installed."""
    if on_step_end is None:
        yield
        return
    scheduler, step, steps = pipe.scheduler, pipe.scheduler.step, itertools.count()

    def stepped(model_output, timestep, *args, **kwargs):
        out = step(model_output, timestep, *args, **kwargs)
        if on_step_end(pipe, next(steps), timestep, {}):
            raise ValueError(f"{name} takes no callback_on_step_end: a step callback cannot "
                             "replace its tensors")
        return out

    scheduler.step = stepped  # an instance attribute over the class's method
    try:
        yield
    finally:
        del scheduler.step
