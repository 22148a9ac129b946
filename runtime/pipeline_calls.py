"""How a pipeline is called for a workload: frames for video only, guidance and CFG as it runs."""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import numpy as np

# Guidance kinds. "cfg": guidance_scale > 1 runs classifier-free guidance (Wan, the reference
# model). "embedded": a guidance-distilled transformer takes the scale as an input, one call per
# step (FLUX.1-dev). "true_cfg": the scale is true_cfg_scale with a negative prompt, two calls
# per step when > 1 (Qwen-Image, FLUX.1 without guidance embeddings).
CFG, EMBEDDED, TRUE_CFG = "cfg", "embedded", "true_cfg"
GUIDANCE_HELP = ("Wan, the reference model: classifier-free guidance when > 1 (two transformer "
                 "calls per step); FLUX.1-dev (guidance embeddings): the embedded guidance, one "
                 "call per step; Qwen-Image, FLUX.1 without guidance embeddings: true CFG "
                 "(true_cfg_scale, a blank negative prompt) when > 1")
# The negative prompt of a true-CFG generation (Qwen-Image's own examples pass one space).
NEGATIVE_PROMPT = " "


@dataclass(frozen=True)
class PipelineCall:
    """What a pipeline's ``__call__`` takes: ``video`` (``num_frames``; else it makes images)
    and its guidance kind. ``name`` is the pipeline class, for messages."""

    name: str
    video: bool
    guidance: str

    @classmethod
    def of(cls, pipe) -> PipelineCall:
        """Read from the pipeline's signature and its transformer's ``guidance_embeds``."""
        parameters = inspect.signature(pipe.__call__).parameters
        if "true_cfg_scale" not in parameters:
            guidance = CFG
        elif pipe.transformer.config.get("guidance_embeds", False):
            guidance = EMBEDDED
        else:
            guidance = TRUE_CFG
        return cls(type(pipe).__name__, "num_frames" in parameters, guidance)

    def cfg(self, guidance_scale: float) -> bool:
        """Whether a generation at ``guidance_scale`` runs the transformer twice per step
        (cond and uncond contexts)."""
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
        """The pipeline's keyword arguments for one generation of ``prompt`` (one or a batch)."""
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

    def samples(self, output) -> np.ndarray:
        """A generation's samples as frames: float [N, F, H, W, 3] (F = 1 for an image)."""
        if self.video:
            return np.asarray(output.frames)
        return np.asarray(output.images)[:, None]
