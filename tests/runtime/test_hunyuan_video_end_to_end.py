"""HunyuanVideo and HunyuanVideo-1.5: profile -> compile -> apply through the Python API on
tiny transformers.

The pipeline steps are driven by hand as in test_joint_end_to_end (the recorder on the
transformer, traces written as the profiler writes them, the compiler, apply_plan), so the
plan's exact removal can be checked on the transformer's own outputs; the CLI on saved tiny
pipelines is tests/e2e/test_cli_hunyuan_video.py. The prompts are padded (both models always
mask their text keys): the profiler masks them too.
"""

from __future__ import annotations

import pytest

from ditplan.policy.compiler import compile_policy
from ditplan.policy.config import CompilerConfig
from ditplan.policy.plan_io import load_plan, save_plan
from ditplan.profiler.config import RecorderSettings
from ditplan.profiler.schema import read_traces
from ditplan.runtime.adapters.base import get_adapter
from tests.hunyuan_video15_factories import tiny_hunyuan_video15, tiny_hunyuan_video15_inputs
from tests.hunyuan_video_factories import tiny_hunyuan_video, tiny_hunyuan_video_inputs
from tests.joint_factories import assert_plan_applies_and_removes_exactly, profile

STEPS = 6
GRID = dict(frames=2, rows=12, cols=20, text_len=9, valid=(6,))  # 480 video + 9 text tokens
SETTINGS = RecorderSettings(block_size=64, tile=(1, 4, 4))
FAMILIES = {"hunyuan_video": (tiny_hunyuan_video, tiny_hunyuan_video_inputs, 9),
            "hunyuan_video15": (tiny_hunyuan_video15, tiny_hunyuan_video15_inputs, 9 + 4 + 5)}
TIMESTEP_MAX = 1000.0  # HV1.5 takes a float timestep
WORKLOAD = dict(height=96, width=160, frames=5, guidance_scale=6.0, cfg=False)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_profile_compile_apply(tmp_path, family):
    make_model, make_inputs, text_len = FAMILIES[family]
    model = make_model()
    blocks = tuple(name for name, _ in get_adapter(model).blocks(model))
    prompt_stats = profile(
        model, lambda seed: make_inputs(**GRID, seed=seed), tmp_path / "traces",
        settings=SETTINGS, steps=STEPS, timestep_max=TIMESTEP_MAX, run_id="hunyuan",
        workload=WORKLOAD)
    for columns in prompt_stats:
        assert set(columns["layer"]) == set(blocks)
        assert (columns["sink_mass"] > 0).all()  # a video: the first frame is a sink
        assert (columns["text_mass"] > 0).all()  # the valid text keys hold attention mass
    # The tiny random model's attention is diffuse, so the balanced preset keeps it dense;
    # a speed target with a fixed density makes the compiler choose sparsity and caching.
    config = CompilerConfig.from_name("fast", target_speedup=1.8, fixed_density=0.3)
    save_plan(compile_policy(tmp_path / "traces", config), tmp_path / "plan.json")
    plan = load_plan(tmp_path / "plan.json")
    assert plan.identity.transformer_class == type(model).__name__
    assert plan.workload.tokens_grid == (2, 12, 20)
    assert plan.block_order == blocks  # HunyuanVideo: dual then single blocks
    assert read_traces(tmp_path / "traces").metadata.model_config.text_len == text_len  # joint
    assert plan.runs and {lp.attention.density for lp in plan.layers.values()} == {0.3}
    assert_plan_applies_and_removes_exactly(model, plan, make_inputs(**GRID, seed=0),
                                            steps=STEPS, timestep_max=TIMESTEP_MAX)
