"""HunyuanVideo and HunyuanVideo-1.5: profile -> compile -> apply through the Python API on
tiny transformers.

Their pipelines' text encoders (Llama and CLIP for HunyuanVideo) are not built in the tests
yet, so the pipeline steps are driven by hand as in test_joint_end_to_end: the recorder on the
transformer, traces written as the profiler writes them, the compiler, apply_plan. The prompts
are padded (both models always mask their text keys): the profiler masks them too.
"""

from __future__ import annotations

import pytest
import torch

from ditplan.policy.compiler import compile_policy
from ditplan.policy.config import CompilerConfig
from ditplan.policy.plan_io import load_plan, save_plan
from ditplan.profiler.config import RecorderSettings
from ditplan.profiler.recorders import ProfileRecorder
from ditplan.profiler.schema import (
    ModelConfig,
    ModelFingerprint,
    TraceMetadata,
    Workload,
    read_traces,
)
from ditplan.profiler.writer import build_tables, library_versions, unit_name, write_unit
from ditplan.runtime.adapters.base import get_adapter
from ditplan.runtime.apply import apply_plan
from ditplan.runtime.fingerprint import model_fingerprint
from tests.hunyuan_video15_factories import tiny_hunyuan_video15, tiny_hunyuan_video15_inputs
from tests.hunyuan_video_factories import tiny_hunyuan_video, tiny_hunyuan_video_inputs

STEPS = 6
GRID = dict(frames=2, rows=12, cols=20, text_len=9, valid=(6,))  # 480 video + 9 text tokens
SETTINGS = RecorderSettings(block_size=64, tile=(1, 4, 4))
FAMILIES = {"hunyuan_video": (tiny_hunyuan_video, tiny_hunyuan_video_inputs, 9),
            "hunyuan_video15": (tiny_hunyuan_video15, tiny_hunyuan_video15_inputs, 9 + 4 + 5)}


def _generate(model, inputs: dict) -> torch.Tensor:
    """A pipeline's loop, by hand: one cond call per step, the timestep falling."""
    with torch.no_grad():
        for step in range(STEPS):
            with model.cache_context("cond", step_index=step, num_inference_steps=STEPS):
                timestep = torch.tensor([1000.0 - 1000.0 * step / STEPS])  # HV1.5: float
                out = model(**{**inputs, "timestep": timestep}).sample
    return out


def _profile(model, make_inputs, out_dir, prompts: int = 2) -> list[dict]:
    """Profile ``prompts`` random prompts into ``out_dir``; each prompt's attention stats."""
    adapter, stats = get_adapter(model), []
    fingerprint = ModelFingerprint(**model_fingerprint(model, with_weights=True))
    for prompt in range(prompts):
        with ProfileRecorder(model, SETTINGS, STEPS) as recorder:
            _generate(model, make_inputs(**GRID, seed=prompt))
            rows = recorder.take_rows()
        metadata = TraceMetadata(
            run_id="hunyuan", fingerprint=fingerprint,
            model_config=ModelConfig(**adapter.model_config(model, recorder.text_len)),
            workload=Workload(steps=STEPS, height=96, width=160, frames=5, guidance_scale=6.0,
                              cfg=False, tokens_grid=recorder.layout.grid),
            profiler_settings=SETTINGS.to_metadata(), library_versions=library_versions())
        stats.append(rows.columns()["attention_stats"])
        tables = build_tables(rows, run_id="hunyuan", prompt_index=prompt, seed=0)
        write_unit(out_dir, unit_name(prompt, 0), tables, metadata)
    return stats


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_profile_compile_apply(tmp_path, family):
    make_model, make_inputs, text_len = FAMILIES[family]
    model = make_model()
    blocks = tuple(name for name, _ in get_adapter(model).blocks(model))
    for columns in _profile(model, make_inputs, tmp_path / "traces"):
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

    inputs = make_inputs(**GRID, seed=0)
    expected = _generate(model, inputs)
    handle = apply_plan(model, plan, backend="torch")
    actual = _generate(model, inputs)
    stats = handle.stats()
    handle.remove()
    assert stats["attention_density"] < 1.0 and stats["blocks_skipped_share"] > 0
    assert torch.isfinite(actual).all() and not torch.equal(actual, expected)
    assert torch.equal(_generate(model, inputs), expected)  # removed exactly
