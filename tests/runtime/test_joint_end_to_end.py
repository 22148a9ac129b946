"""FLUX.1 and Qwen-Image: profile -> compile -> apply through the Python API on tiny transformers.

The pipeline steps are driven by hand on the bare transformer (the recorder, traces written as
the profiler writes them, the compiler, apply_plan), so each piece is checked without text
encoders; the CLI on saved tiny pipelines is tests/e2e/test_cli_images.py.
"""

from __future__ import annotations

import pytest
import torch

from ditplan.policy.compiler import compile_policy
from ditplan.policy.config import CompilerConfig
from ditplan.policy.plan_io import load_plan, save_plan
from ditplan.profiler.config import RecorderSettings
from ditplan.profiler.recorders import ProfileRecorder
from ditplan.profiler.schema import ModelConfig, ModelFingerprint, TraceMetadata, Workload
from ditplan.profiler.writer import build_tables, library_versions, unit_name, write_unit
from ditplan.runtime.adapters.base import get_adapter
from ditplan.runtime.apply import apply_plan
from ditplan.runtime.fingerprint import model_fingerprint
from tests.flux_factories import tiny_flux, tiny_flux_inputs
from tests.qwenimage_factories import tiny_qwenimage, tiny_qwenimage_inputs

STEPS = 6
GRID = dict(rows=12, cols=20, text_len=9)  # 240 image + 9 text tokens
SETTINGS = RecorderSettings(block_size=64, tile=(1, 4, 4))
FAMILIES = {"flux": (tiny_flux, tiny_flux_inputs),
            "qwenimage": (tiny_qwenimage, tiny_qwenimage_inputs)}


def _generate(model, inputs: dict) -> torch.Tensor:
    """A pipeline's loop, by hand: one cond call per step, the timestep falling."""
    with torch.no_grad():
        for step in range(STEPS):
            with model.cache_context("cond", step_index=step, num_inference_steps=STEPS):
                out = model(**{**inputs, "timestep": torch.tensor([1 - step / STEPS])}).sample
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
            run_id="joint", fingerprint=fingerprint,
            model_config=ModelConfig(**adapter.model_config(model, recorder.text_len)),
            workload=Workload(steps=STEPS, height=192, width=320, frames=1, guidance_scale=3.5,
                              cfg=False, tokens_grid=recorder.layout.grid),
            profiler_settings=SETTINGS.to_metadata(), library_versions=library_versions())
        stats.append(rows.columns()["attention_stats"])
        tables = build_tables(rows, run_id="joint", prompt_index=prompt, seed=0)
        write_unit(out_dir, unit_name(prompt, 0), tables, metadata)
    return stats


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_profile_compile_apply(tmp_path, family):
    make_model, make_inputs = FAMILIES[family]
    model = make_model()
    blocks = tuple(name for name, _ in get_adapter(model).blocks(model))
    for columns in _profile(model, make_inputs, tmp_path / "traces"):
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

    inputs = make_inputs(**GRID, seed=0)
    expected = _generate(model, inputs)
    handle = apply_plan(model, plan, backend="torch")
    actual = _generate(model, inputs)
    stats = handle.stats()
    handle.remove()
    assert stats["attention_density"] < 1.0 and stats["blocks_skipped_share"] > 0
    assert torch.isfinite(actual).all() and not torch.equal(actual, expected)
    assert torch.equal(_generate(model, inputs), expected)  # removed exactly
