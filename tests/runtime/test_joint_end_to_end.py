"""FLUX.1 and Qwen-Image: profile -> compile -> apply through the Python API on tiny transformers.

The pipeline steps are driven by hand on the bare transformer (the recorder, traces written as
the profiler writes them, the compiler, apply_plan), so each piece is checked without text
encoders; the CLI on saved tiny pipelines is tests/e2e/test_cli_images.py.
"""

from __future__ import annotations

import pytest

from ditplan.policy.compiler import compile_policy
from ditplan.policy.config import CompilerConfig
from ditplan.policy.plan_io import load_plan, save_plan
from ditplan.profiler.config import RecorderSettings
from ditplan.runtime.adapters.base import get_adapter
from tests.flux_factories import tiny_flux, tiny_flux_inputs
from tests.joint_factories import assert_plan_applies_and_removes_exactly, profile
from tests.qwenimage_factories import tiny_qwenimage, tiny_qwenimage_inputs

STEPS = 6
GRID = dict(rows=12, cols=20, text_len=9)  # 240 image + 9 text tokens
SETTINGS = RecorderSettings(block_size=64, tile=(1, 4, 4))
FAMILIES = {"flux": (tiny_flux, tiny_flux_inputs),
            "qwenimage": (tiny_qwenimage, tiny_qwenimage_inputs)}
TIMESTEP_MAX = 1  # the flow-matching timestep falls from 1
WORKLOAD = dict(height=192, width=320, frames=1, guidance_scale=3.5, cfg=False)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_profile_compile_apply(tmp_path, family):
    make_model, make_inputs = FAMILIES[family]
    model = make_model()
    blocks = tuple(name for name, _ in get_adapter(model).blocks(model))
    prompt_stats = profile(
        model, lambda seed: make_inputs(**GRID, seed=seed), tmp_path / "traces",
        settings=SETTINGS, steps=STEPS, timestep_max=TIMESTEP_MAX, run_id="joint",
        workload=WORKLOAD)
    for columns in prompt_stats:
        assert set(columns["layer"]) == set(blocks)
        assert (columns["sink_mass"] == 0).all()  # images have no first-frame sink
        assert (columns["text_mass"] > 0).all()  # the text blocks hold attention mass
    # The tiny random model's attention is diffuse, so the balanced preset keeps it dense;
    # a speed target with a fixed density makes the compiler choose sparsity and caching.
    config = CompilerConfig.from_name("fast", target_speedup=1.8, fixed_density=0.3)
    save_plan(compile_policy(tmp_path / "traces", config), tmp_path / "plan.json")
    plan = load_plan(tmp_path / "plan.json")
    assert plan.identity.transformer_class == type(model).__name__
    assert plan.workload.tokens_grid == (1, 12, 20)
    assert plan.block_order == blocks  # FLUX: dual then single blocks
    assert plan.runs and {lp.attention.density for lp in plan.layers.values()} == {0.3}
    assert_plan_applies_and_removes_exactly(model, plan, make_inputs(**GRID, seed=0),
                                            steps=STEPS, timestep_max=TIMESTEP_MAX)
