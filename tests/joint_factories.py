"""Plans, steps and shared checks for tiny joint-attention transformers (FLUX.1, Qwen-Image,
HunyuanVideo, HunyuanVideo-1.5), for CPU tests."""

from __future__ import annotations

import pytest
import torch

from ditplan.policy.plan import (
    AttentionSpec,
    LayerPlan,
    ModelIdentity,
    Plan,
    PlanDefaults,
    Provenance,
    RoleClassification,
    Workload,
)
from ditplan.profiler.config import RecorderSettings
from ditplan.profiler.recorders import ProfileRecorder
from ditplan.profiler.schema import ModelConfig, ModelFingerprint, TraceMetadata
from ditplan.profiler.schema import Workload as TraceWorkload
from ditplan.profiler.writer import build_tables, library_versions, unit_name, write_unit
from ditplan.runtime.adapters.base import get_adapter
from ditplan.runtime.apply import apply_plan, apply_sparse_attention
from ditplan.runtime.fingerprint import model_fingerprint


def tiny_joint_plan(model, *, steps: int = 2, density: float = 0.3, tile=(1, 4, 8), runs=(),
                    cfg: bool = False) -> Plan:
    """A valid plan for ``model`` (a tiny joint-attention transformer, whose attention layers
    are ``<block>.attn``): every layer at ``density`` from step 1 (step 0 dense), ``runs``
    (BlockRun) as given."""
    blocks = tuple(name for name, _ in get_adapter(model).blocks(model))
    spec = AttentionSpec(density=density, block_size=64, tile=tuple(tile), sink=False,
                         dense_steps=(0,))
    return Plan(
        identity=ModelIdentity(**model_fingerprint(model)),
        workload=Workload(steps=steps, height=128, width=160, frames=1, guidance_scale=3.5,
                          cfg=cfg),
        provenance=Provenance(
            trace_hash="0" * 64, compiler_version="test", compiler_settings={},
            roles=RoleClassification("fixed", ("r_attn",), None, dict.fromkeys(blocks, 1.0)),
            predicted_speedup=1.5, predicted_error=0.0),
        defaults=PlanDefaults(AttentionSpec()),
        block_order=blocks,
        layers={b: LayerPlan("foreground", f"{b}.attn", spec) for b in blocks},
        runs=tuple(runs),
    )


def count_attention_calls(model, blocks) -> dict[str, int]:
    """Calls of each of ``blocks``' ``<block>.attn``, counted from now on (forward hooks)."""
    calls = dict.fromkeys(blocks, 0)
    for name in blocks:
        def count(module, args, output, name=name):
            calls[name] += 1
        model.get_submodule(f"{name}.attn").register_forward_hook(count)
    return calls


def assert_processor_refused(model, attention: str, processor, match: str) -> None:
    """With ``attention`` (a layer's name) running ``processor``, apply_sparse_attention
    raises ValueError matching ``match`` before installing anything: with the original
    processor back, it applies and removes."""
    attn = model.get_submodule(attention)
    original = attn.processor
    attn.set_processor(processor)
    with pytest.raises(ValueError, match=match):
        apply_sparse_attention(model, AttentionSpec(density=0.3, block_size=64))
    attn.set_processor(original)  # refused before anything was installed
    apply_sparse_attention(model, AttentionSpec(density=0.3, block_size=64)).remove()


def generate(model, inputs: dict, *, steps: int, timestep_max: float) -> torch.Tensor:
    """A pipeline's loop, by hand: one cond call per step, the timestep falling from
    ``timestep_max``; the last step's output."""
    with torch.no_grad():
        for step in range(steps):
            with model.cache_context("cond", step_index=step, num_inference_steps=steps):
                timestep = torch.tensor([timestep_max - timestep_max * step / steps])
                out = model(**{**inputs, "timestep": timestep}).sample
    return out


def profile(model, prompt_inputs, out_dir, *, settings: RecorderSettings, steps: int,
            timestep_max: float, run_id: str, workload: dict, prompts: int = 2) -> list[dict]:
    """Profile ``prompts`` prompts (``prompt_inputs(seed=prompt)`` each) into ``out_dir`` as the
    profiler writes them, ``workload`` the trace Workload's fields but steps and the token grid;
    each prompt's attention stats."""
    adapter, stats = get_adapter(model), []
    fingerprint = ModelFingerprint(**model_fingerprint(model, with_weights=True))
    for prompt in range(prompts):
        with ProfileRecorder(model, settings, steps) as recorder:
            generate(model, prompt_inputs(seed=prompt), steps=steps, timestep_max=timestep_max)
            rows = recorder.take_rows()
        metadata = TraceMetadata(
            run_id=run_id, fingerprint=fingerprint,
            model_config=ModelConfig(**adapter.model_config(model, recorder.text_len)),
            workload=TraceWorkload(steps=steps, **workload, tokens_grid=recorder.layout.grid),
            profiler_settings=settings.to_metadata(), library_versions=library_versions())
        stats.append(rows.columns()["attention_stats"])
        tables = build_tables(rows, run_id=run_id, prompt_index=prompt, seed=0)
        write_unit(out_dir, unit_name(prompt, 0), tables, metadata)
    return stats


def assert_plan_applies_and_removes_exactly(model, plan: Plan, inputs: dict, *, steps: int,
                                            timestep_max: float) -> None:
    """A generation under ``plan`` runs sparse and skips blocks, and differs from the dense
    one; with ``compile=`` (dynamo's eager backend: the same ops) it is the same generation;
    after ``remove()`` the model generates the dense output bitwise."""
    expected = generate(model, inputs, steps=steps, timestep_max=timestep_max)
    handle = apply_plan(model, plan, backend="torch")
    actual = generate(model, inputs, steps=steps, timestep_max=timestep_max)
    stats = handle.stats()
    handle.remove()
    assert stats["attention_density"] < 1.0 and stats["blocks_skipped_share"] > 0
    assert torch.isfinite(actual).all() and not torch.equal(actual, expected)
    torch._dynamo.reset()
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    handle = apply_plan(model, plan, backend="torch", compile={"backend": "eager"})
    compiled = generate(model, inputs, steps=steps, timestep_max=timestep_max)
    handle.remove()
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > graphs  # blocks compiled
    assert torch.equal(compiled, actual)
    assert torch.equal(generate(model, inputs, steps=steps, timestep_max=timestep_max),
                       expected)  # removed exactly
