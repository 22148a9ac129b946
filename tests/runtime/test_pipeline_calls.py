"""PipelineCall: frames only for video pipelines, guidance as each pipeline kind takes it."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
from diffusers import ClassifierFreeGuidance

from ditplan.runtime.pipeline_calls import (
    CFG,
    EMBEDDED,
    GUIDER,
    NEGATIVE_PROMPT,
    TRUE_CFG,
    PipelineCall,
)


class VideoPipeline:  # Wan, the reference model
    def __call__(self, prompt, num_inference_steps, height, width, num_frames, guidance_scale,
                 callback_on_step_end=None, callback_on_step_end_tensor_inputs=("latents",)):
        return callback_on_step_end, callback_on_step_end_tensor_inputs


class ImagePipeline:  # FLUX.1, Qwen-Image
    def __init__(self, guidance_embeds: bool):
        self.transformer = SimpleNamespace(config={"guidance_embeds": guidance_embeds})

    def __call__(self, prompt, negative_prompt=None, true_cfg_scale=1.0, height=None,
                 width=None, num_inference_steps=28, guidance_scale=3.5,
                 callback_on_step_end=None):
        pass


class Scheduler:
    def step(self, model_output, timestep, sample):
        return sample


class GuiderPipeline:  # HunyuanVideo-1.5: a guider, no guidance argument, no step callbacks
    def __init__(self):
        self.guider = ClassifierFreeGuidance(guidance_scale=6.0)
        self.scheduler = Scheduler()
        self.scales: list[float] = []  # the guider's scale in each call

    def __call__(self, prompt, num_inference_steps, height=None, width=None, num_frames=121):
        self.scales.append(self.guider.guidance_scale)
        for t in range(num_inference_steps):
            self.scheduler.step(None, 10 * t, None)
        return "video"


WORK = dict(steps=4, height=16, width=32, frames=1, guidance_scale=3.5)


def test_kinds_from_the_signature_and_guidance_embeddings():
    assert PipelineCall.of(VideoPipeline()) == PipelineCall("VideoPipeline", True, CFG)
    assert PipelineCall.of(ImagePipeline(True)) == PipelineCall("ImagePipeline", False, EMBEDDED)
    assert PipelineCall.of(ImagePipeline(False)).guidance == TRUE_CFG


def test_arguments_and_cfg_per_kind():
    video = PipelineCall.of(VideoPipeline())
    assert video.arguments("p", **{**WORK, "frames": 5}) == dict(
        prompt="p", num_inference_steps=4, height=16, width=32, num_frames=5,
        guidance_scale=3.5)
    assert video.cfg(3.5) and not video.cfg(1.0)
    embedded = PipelineCall.of(ImagePipeline(True))
    assert embedded.arguments("p", **WORK) == dict(
        prompt="p", num_inference_steps=4, height=16, width=32, guidance_scale=3.5,
        true_cfg_scale=1.0)
    assert not embedded.cfg(3.5)  # one transformer call per step
    true_cfg = PipelineCall.of(ImagePipeline(False))
    assert true_cfg.arguments(["a", "b"], **WORK) == dict(
        prompt=["a", "b"], num_inference_steps=4, height=16, width=32, true_cfg_scale=3.5,
        negative_prompt=[NEGATIVE_PROMPT] * 2)
    assert "negative_prompt" not in true_cfg.arguments("p", **{**WORK, "guidance_scale": 1.0})
    assert true_cfg.cfg(3.5) and not true_cfg.cfg(1.0)


def test_frames_and_samples():
    video, image = PipelineCall.of(VideoPipeline()), PipelineCall.of(ImagePipeline(True))
    assert (video.frames(None, 16), video.frames(3, 16), image.frames(None), image.frames(1)) \
        == (16, 3, 1, 1)
    with pytest.raises(ValueError, match="ImagePipeline generates images: --frames 4"):
        image.frames(4)
    with pytest.raises(ValueError, match="generates images"):
        image.arguments("p", **{**WORK, "frames": 4})
    frames = np.zeros((2, 3, 8, 8, 3))
    assert video.samples(SimpleNamespace(frames=frames)).shape == (2, 3, 8, 8, 3)
    assert image.samples(SimpleNamespace(images=frames[:, 0])).shape == (2, 1, 8, 8, 3)


def test_invoke_passes_step_callbacks_to_the_pipeline():
    pipe, on_step_end = VideoPipeline(), lambda pipe, step, timestep, tensors: {}
    call = PipelineCall.of(pipe)
    arguments = call.arguments("p", **{**WORK, "frames": 5})
    assert call.invoke(pipe, arguments, on_step_end) == (on_step_end, ["latents"])
    assert call.invoke(pipe, arguments) == (None, ("latents",))


def test_a_guider_pipeline_gets_the_scale_and_its_scheduler_steps_end_steps():
    pipe = GuiderPipeline()
    call = PipelineCall.of(pipe)
    assert call == PipelineCall("GuiderPipeline", True, GUIDER, step_callbacks=False)
    assert call.cfg(3.5) and call.cfg(0.5) and not call.cfg(1.0)
    arguments = call.arguments("p", **{**WORK, "frames": 5})
    ended = []
    assert call.invoke(pipe, arguments,
                       lambda p, step, t, tensors: ended.append((step, t, tensors))) == "video"
    assert ended == [(0, 0, {}), (1, 10, {}), (2, 20, {}), (3, 30, {})]
    assert pipe.scales == [3.5] and pipe.guider.guidance_scale == 6.0  # restored after
    assert "step" not in vars(pipe.scheduler)  # the scheduler's own step is back
    with pytest.raises(ValueError, match="GuiderPipeline takes no callback_on_step_end"):
        call.invoke(pipe, arguments, lambda p, step, t, tensors: {"latents": None})
    assert pipe.guider.guidance_scale == 6.0 and "step" not in vars(pipe.scheduler)
