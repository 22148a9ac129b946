"""FLUX.1, Qwen-Image, HunyuanVideo and HunyuanVideo-1.5: profile -> compile -> apply through the
Python API on tiny transformers.

The pipeline steps are driven by hand on the bare transformer (the recorder, traces written as
the profiler writes them, the compiler, apply_plan), so each piece is checked without text
encoders and the plan's exact removal on the transformer's own outputs; the CLI on saved tiny
pipelines is tests/e2e/test_cli_images.py and tests/e2e/test_cli_hunyuan_video.py. The video
models' prompts are padded (both always mask their text keys): the profiler masks them too.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import pytest

from ditplan.policy.compiler import compile_policy
from ditplan.policy.config import CompilerConfig
from ditplan.policy.plan_io import load_plan, save_plan
from ditplan.profiler.config import RecorderSettings
from ditplan.profiler.schema import read_traces
from ditplan.runtime.adapters.base import get_adapter
from tests.flux_factories import tiny_flux, tiny_flux_inputs
from tests.hunyuan_video15_factories import tiny_hunyuan_video15, tiny_hunyuan_video15_inputs
from tests.hunyuan_video_factories import tiny_hunyuan_video, tiny_hunyuan_video_inputs
from tests.joint_factories import assert_plan_applies_and_removes_exactly, profile
from tests.qwenimage_factories import tiny_qwenimage, tiny_qwenimage_inputs

STEPS = 6
SETTINGS = RecorderSettings(block_size=64, tile=(1, 4, 4))
IMAGE_GRID = dict(rows=12, cols=20, text_len=9)  # 240 image + 9 text tokens
VIDEO_GRID = dict(frames=2, rows=12, cols=20, text_len=9, valid=(6,))  # 480 video + 9 text
IMAGE_WORKLOAD = dict(height=192, width=320, frames=1, guidance_scale=3.5, cfg=False)
VIDEO_WORKLOAD = dict(height=96, width=160, frames=5, guidance_scale=6.0, cfg=False)


class Family(NamedTuple):
    make_model: Callable
    make_inputs: Callable
    grid: dict
    workload: dict
    timestep_max: float  # FLUX/Qwen: the flow-matching timestep falls from 1; HV1.5 takes floats
    tokens_grid: tuple[int, int, int]
    text_len: int | None  # the traced joint text length (checked for the video models)


FAMILIES = {
    "flux": Family(tiny_flux, tiny_flux_inputs, IMAGE_GRID, IMAGE_WORKLOAD, 1, (1, 12, 20), None),
    "qwenimage": Family(tiny_qwenimage, tiny_qwenimage_inputs, IMAGE_GRID, IMAGE_WORKLOAD, 1,
                        (1, 12, 20), None),
    "hunyuan_video": Family(tiny_hunyuan_video, tiny_hunyuan_video_inputs, VIDEO_GRID,
                            VIDEO_WORKLOAD, 1000.0, (2, 12, 20), 9),
    "hunyuan_video15": Family(tiny_hunyuan_video15, tiny_hunyuan_video15_inputs, VIDEO_GRID,
                              VIDEO_WORKLOAD, 1000.0, (2, 12, 20), 9 + 4 + 5),
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_profile_compile_apply(tmp_path, family):
    spec = FAMILIES[family]
    model = spec.make_model()
    blocks = tuple(name for name, _ in get_adapter(model).blocks(model))
    prompt_stats = profile(
        model, lambda seed: spec.make_inputs(**spec.grid, seed=seed), tmp_path / "traces",
        settings=SETTINGS, steps=STEPS, timestep_max=spec.timestep_max, run_id=family,
        workload=spec.workload)
    video = spec.workload["frames"] > 1
    for columns in prompt_stats:
        assert set(columns["layer"]) == set(blocks)
        # a video's first frame is a sink; images have none
        assert ((columns["sink_mass"] > 0) if video else (columns["sink_mass"] == 0)).all()
        assert (columns["text_mass"] > 0).all()  # the (valid) text keys hold attention mass
    # The tiny random model's attention is diffuse, so the balanced preset keeps it dense;
    # a speed target with a fixed density makes the compiler choose sparsity and caching.
    config = CompilerConfig.from_name("fast", target_speedup=1.8, fixed_density=0.3)
    save_plan(compile_policy(tmp_path / "traces", config), tmp_path / "plan.json")
    plan = load_plan(tmp_path / "plan.json")
    assert plan.identity.transformer_class == type(model).__name__
    assert plan.workload.tokens_grid == spec.tokens_grid
    assert plan.block_order == blocks  # FLUX, HunyuanVideo: dual then single blocks
    if spec.text_len is not None:
        text_len = read_traces(tmp_path / "traces").metadata.model_config.text_len
        assert text_len == spec.text_len  # joint: every text input counted
    assert plan.runs and {lp.attention.density for lp in plan.layers.values()} == {0.3}
    assert_plan_applies_and_removes_exactly(model, plan, spec.make_inputs(**spec.grid, seed=0),
                                            steps=STEPS, timestep_max=spec.timestep_max)
