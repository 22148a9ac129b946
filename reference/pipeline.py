"""ReferenceVideoPipeline: captions in, pixel-space video out; rectified-flow Euler with CFG."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler, WanTransformer3DModel
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image

from ditplan.reference.captions import CaptionEncoder

OUTPUT_TYPES = ("pt", "np", "pil", "latent")


@dataclass
class ReferenceVideoPipelineOutput(BaseOutput):
    """frames: float [B, F, H, W, 3] in [0, 1] (tensor or numpy), a list of lists of PIL images,
    or for output_type="latent" the raw sample [B, 3, F, H, W] in about [-1, 1]."""

    frames: Any


class ReferenceVideoPipeline(DiffusionPipeline):
    """Text-to-video for ditplan's reference DiT, which works directly in pixel space (no VAE).

    The two classifier-free-guidance branches are separate transformer calls inside
    `transformer.cache_context("cond")` / `cache_context("uncond")`, as in diffusers' WanPipeline,
    so cache hooks keep per-branch state. The unconditional input is the null (empty) caption.

    Args:
        transformer: a WanTransformer3DModel with in_channels = out_channels = 3.
        text_encoder: the CaptionEncoder whose text_dim matches the transformer's.
        scheduler: a FlowMatchEulerDiscreteScheduler.
    """

    model_cpu_offload_seq = "text_encoder->transformer"
    _callback_tensor_inputs = ["latents", "prompt_embeds", "negative_prompt_embeds"]

    def __init__(
        self,
        transformer: WanTransformer3DModel,
        text_encoder: CaptionEncoder,
        scheduler: FlowMatchEulerDiscreteScheduler,
    ):
        super().__init__()
        self.register_modules(transformer=transformer, text_encoder=text_encoder,
                              scheduler=scheduler)

    def encode_prompt(
        self, prompt: str | list[str], do_classifier_free_guidance: bool, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Embeds prompts and, for CFG, the null caption.

        Returns:
            prompt_embeds [B, L, text_dim] and negative_prompt_embeds [B, L, text_dim] or None.
        """
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        ids = self.text_encoder.tokenize(prompts).to(device)  # ids: [B, L]
        embeds = self.text_encoder(ids)
        if not do_classifier_free_guidance:
            return embeds, None
        null = self.text_encoder(self.text_encoder.tokenize([""]).to(device))
        return embeds, null.expand_as(embeds)

    def check_inputs(self, height, width, num_frames, num_inference_steps, output_type,
                     callback_on_step_end_tensor_inputs):
        _, ph, pw = self.transformer.config.patch_size
        if height % ph or width % pw or height <= 0 or width <= 0:
            raise ValueError(f"height and width must be positive multiples of the patch size "
                             f"({ph}, {pw}); got {height} x {width}")
        if num_frames < 1 or num_inference_steps < 1:
            raise ValueError("num_frames and num_inference_steps must be >= 1")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
        bad = set(callback_on_step_end_tensor_inputs) - set(self._callback_tensor_inputs)
        if bad:
            raise ValueError(f"callback tensor inputs {sorted(bad)} not in "
                             f"{self._callback_tensor_inputs}")

    def prepare_latents(self, batch_size, num_frames, height, width, device, generator, latents):
        """Pure noise float32 [B, C, F, H, W], or the given latents moved to `device`."""
        shape = (batch_size, self.transformer.config.in_channels, num_frames, height, width)
        if latents is not None:
            if tuple(latents.shape) != shape:
                raise ValueError(f"latents have shape {tuple(latents.shape)}, expected {shape}")
            return latents.to(device=device, dtype=torch.float32)
        return randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)

    def _model_at(self, t: torch.Tensor):
        """The transformer that denoises at timestep ``t`` (one here; two experts in
        reference.experts)."""
        return self.transformer

    def _predict(self, latents, t, embeds, context, step_kwargs, attention_kwargs):
        model = self._model_at(t)
        dtype = model.dtype
        with model.cache_context(context, **step_kwargs):
            return model(
                hidden_states=latents.to(dtype),
                timestep=t.expand(latents.shape[0]),
                encoder_hidden_states=embeds.to(dtype),
                attention_kwargs=attention_kwargs,
                return_dict=False,
            )[0].float()

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        num_inference_steps: int = 32,
        guidance_scale: float = 4.0,
        num_frames: int = 16,
        height: int = 48,
        width: int = 48,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pt",
        return_dict: bool = True,
        attention_kwargs: dict[str, Any] | None = None,
        callback_on_step_end: Callable[[Any, int, torch.Tensor, dict], dict] | None = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
    ) -> ReferenceVideoPipelineOutput | tuple:
        """Generates videos for captions.

        Args:
            prompt: caption or captions from the reference vocabulary (B of them).
            num_inference_steps: Euler steps from sigma 1 (noise) to 0.
            guidance_scale: CFG weight w; output = uncond + w * (cond - uncond). <= 1 disables CFG.
            num_frames, height, width: video size in frames and pixels.
            generator: torch.Generator(s) for the initial noise.
            latents: optional initial noise float [B, 3, F, H, W].
            output_type: "pt" (tensor), "np", "pil" (lists of images) or "latent".
            return_dict: return a ReferenceVideoPipelineOutput instead of a tuple.
            attention_kwargs: passed to the transformer's attention processors.
            callback_on_step_end: fn(pipe, step, timestep, tensors) -> dict of replacements.
            callback_on_step_end_tensor_inputs: names from _callback_tensor_inputs to pass.

        Returns:
            ReferenceVideoPipelineOutput with frames [B, F, H, W, 3] in [0, 1] (see output_type).
        """
        self.check_inputs(height, width, num_frames, num_inference_steps, output_type,
                          callback_on_step_end_tensor_inputs)
        device = self._execution_device
        do_cfg = guidance_scale > 1.0
        prompt_embeds, negative_prompt_embeds = self.encode_prompt(prompt, do_cfg, device)
        latents = self.prepare_latents(prompt_embeds.shape[0], num_frames, height, width, device,
                                       generator, latents)
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        self.scheduler.set_begin_index(0)
        timesteps = self.scheduler.timesteps
        sigmas = self.scheduler.sigmas.tolist()  # one host read, none inside the loop
        with self.progress_bar(total=len(timesteps)) as progress_bar:
            for i, t in enumerate(timesteps):
                step_kwargs = dict(step_index=i, sigma=sigmas[i],
                                   num_inference_steps=len(timesteps))
                velocity = self._predict(latents, t, prompt_embeds, "cond", step_kwargs,
                                         attention_kwargs)
                if do_cfg:
                    uncond = self._predict(latents, t, negative_prompt_embeds, "uncond",
                                           step_kwargs, attention_kwargs)
                    velocity = uncond + guidance_scale * (velocity - uncond)
                latents = self.scheduler.step(velocity, t, latents, return_dict=False)[0]
                if callback_on_step_end is not None:
                    available = {"latents": latents, "prompt_embeds": prompt_embeds,
                                 "negative_prompt_embeds": negative_prompt_embeds}
                    tensors = {k: available[k] for k in callback_on_step_end_tensor_inputs}
                    replaced = callback_on_step_end(self, i, t, tensors)
                    latents = replaced.pop("latents", latents)
                    prompt_embeds = replaced.pop("prompt_embeds", prompt_embeds)
                    negative_prompt_embeds = replaced.pop("negative_prompt_embeds",
                                                          negative_prompt_embeds)
                progress_bar.update()
        self.maybe_free_model_hooks()
        frames = latents if output_type == "latent" else postprocess_video(latents, output_type)
        return ReferenceVideoPipelineOutput(frames=frames) if return_dict else (frames,)


def postprocess_video(sample: torch.Tensor, output_type: str = "pt"):
    """Converts a sample [B, 3, F, H, W] in [-1, 1] to frames [B, F, H, W, 3] in [0, 1].

    Args:
        sample: float [B, 3, F, H, W].
        output_type: "pt" (float tensor), "np" (float32 array) or "pil" (B lists of F images).

    Returns:
        frames in the requested type.
    """
    frames = ((sample.float().clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 4, 1)  # [B, F, H, W, 3]
    if output_type == "pt":
        return frames
    array = frames.cpu().numpy()
    if output_type == "np":
        return array
    if output_type == "pil":
        as_bytes = (array * 255).round().astype(np.uint8)
        return [[Image.fromarray(frame) for frame in video] for video in as_bytes]
    raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
