"""PipelineCall: frames only for video pipelines, guidance as each pipeline kind takes it."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from ditplan.runtime.pipeline_calls import CFG, EMBEDDED, NEGATIVE_PROMPT, TRUE_CFG, PipelineCall


class VideoPipeline:  # Wan, the reference model
    def __call__(self, prompt, num_inference_steps, height, width, num_frames, guidance_scale):
        pass


class ImagePipeline:  # FLUX.1, Qwen-Image
    def __init__(self, guidance_embeds: bool):
        self.transformer = SimpleNamespace(config={"guidance_embeds": guidance_embeds})

    def __call__(self, prompt, negative_prompt=None, true_cfg_scale=1.0, height=None,
                 width=None, num_inference_steps=28, guidance_scale=3.5):
        pass


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
