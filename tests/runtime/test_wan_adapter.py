"""The Wan adapter (interface v2): processor signature, per-token timesteps, experts."""

from __future__ import annotations

import dataclasses
import inspect
from types import SimpleNamespace

import pytest
import torch

from ditplan.policy.plan import AttentionSpec
from ditplan.runtime.adapters.base import FAMILY_MODULES, get_adapter
from ditplan.runtime.apply import apply_sparse_attention
from tests.factories import tiny_wan, tiny_wan_inputs
from tests.flux_factories import tiny_flux
from tests.hunyuan_video15_factories import tiny_hunyuan_video15
from tests.hunyuan_video_factories import tiny_hunyuan_video
from tests.qwenimage_factories import tiny_qwenimage

TINY_MODELS = {"WanTransformer3DModel": tiny_wan, "FluxTransformer2DModel": tiny_flux,
               "QwenImageTransformer2DModel": tiny_qwenimage,
               "HunyuanVideoTransformer3DModel": tiny_hunyuan_video,
               "HunyuanVideo15Transformer3DModel": tiny_hunyuan_video15}


def parameters(function) -> list[tuple]:
    return [(p.name, p.kind, p.default) for p in inspect.signature(function).parameters.values()]


@pytest.mark.parametrize("class_name", sorted(FAMILY_MODULES))
def test_sparse_processor_declares_the_original_processors_parameters(class_name):
    # diffusers drops the keywords a processor does not declare: the sparse processor must
    # declare exactly the original's (names, kinds, defaults).
    model = TINY_MODELS[class_name]()
    adapter = get_adapter(model)
    originals = {type(attn.processor) for _, attn in adapter.attention_layers(model)}
    assert originals
    for original in originals:
        assert parameters(adapter.processor_class.__call__) == parameters(original.__call__)


@pytest.mark.parametrize("tile", [(1, 4, 4), (2, 4, 8)])
def test_per_token_timesteps_follow_the_permutation(tile):
    """Wan2.2 TI2V passes a [B, S] timestep; keeping every block, sparse equals dense."""
    model, inputs = tiny_wan(), tiny_wan_inputs(frames=3, height=16, width=24)
    tokens = 3 * 8 * 12
    timestep = (torch.arange(tokens) * 37 % 1000)[None]  # [1, S], varies inside every frame
    inputs = {**inputs, "timestep": timestep}
    with torch.no_grad():
        expected = model(**inputs).sample
    spec = AttentionSpec(density=None, mass_threshold=1.0, block_size=64, tile=tile)
    handle = apply_sparse_attention(model, spec, backend="torch")
    with torch.no_grad():
        actual = model(**inputs).sample
    handle.remove()
    assert torch.equal(inputs["timestep"], timestep)  # the caller's timestep is not permuted
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


def test_experts_are_the_pipelines_transformers():
    adapter = get_adapter(tiny_wan())
    model = tiny_wan()
    assert adapter.experts(SimpleNamespace(transformer=model)) == ["transformer"]
    two_experts = SimpleNamespace(transformer=model, transformer_2=model)  # Wan2.2 A14B
    assert adapter.experts(two_experts) == ["transformer", "transformer_2"]
    one_of_two = SimpleNamespace(transformer=model, transformer_2=None)  # Wan2.2 TI2V-5B
    assert adapter.experts(one_of_two) == ["transformer"]


def _attn1_rotary_widths(model) -> tuple[list[int], object]:
    widths = []
    hook = model.blocks[0].attn1.register_forward_pre_hook(
        lambda module, args: widths.append(args[3][0].shape[-1]))
    return widths, hook


def test_with_every_layer_sparse_the_rotary_tables_are_kept_compact_with_the_same_outputs(
        monkeypatch):
    """Wan's attention reads one channel of each pair of its rotary tables; with every layer
    sparse the permuted tables keep those only, and dense steps (diffusers' processor) and
    sparse steps give the very outputs they give with diffusers' full tables."""
    from ditplan.runtime.adapters.wan import WanAdapter
    from tests.factories import run_steps

    model, inputs = tiny_wan(), tiny_wan_inputs(frames=3, height=16, width=24)
    spec = AttentionSpec(density=0.5, block_size=64, tile=(1, 4, 4), dense_steps=(0,))
    widths, hook = _attn1_rotary_widths(model)
    handle = apply_sparse_attention(model, spec, backend="torch")
    compact = run_steps(model, inputs, steps=2, context="cond")  # step 0 dense, 1 sparse
    handle.remove()
    assert widths == [8, 8]  # head dim 16: half of diffusers' tables

    full_points = WanAdapter.permute_points
    monkeypatch.setattr(WanAdapter, "permute_points", lambda self, t: [
        dataclasses.replace(p, channels=None) for p in full_points(self, t)])
    widths.clear()
    handle = apply_sparse_attention(model, spec, backend="torch")
    full = run_steps(model, inputs, steps=2, context="cond")
    handle.remove()
    hook.remove()
    assert widths == [16, 16]
    for a, b in zip(compact, full, strict=True):
        assert torch.equal(a, b)


def test_with_a_dense_layer_the_rotary_tables_stay_whole():
    model, inputs = tiny_wan(), tiny_wan_inputs(frames=3, height=16, width=24)
    sparse = AttentionSpec(density=0.5, block_size=64, tile=(1, 4, 4))
    widths, hook = _attn1_rotary_widths(model)
    handle = apply_sparse_attention(
        model, {"blocks.0.attn1": AttentionSpec(density=1.0), "blocks.1.attn1": sparse},
        backend="torch")
    with torch.no_grad():
        model(**inputs)
    handle.remove()
    hook.remove()
    assert widths == [16]  # blocks.0 keeps diffusers' processor, which reads whole tables


def test_every_layer_sparse_holds_no_more_than_dense_where_dense_peaks():
    """At each feed-forward activation (a dense forward's peak) the sparse forward's live
    tensors, the token permutation's tables included, take no more than dense's: the compact
    rotary tables save more than the permutation's index tables cost (the fa4 forward measured
    +1.2 MiB over dense before them: BENCHMARKS.md, issue 14)."""
    from tests.live_storage import LiveStorages

    model, inputs = tiny_wan(), tiny_wan_inputs(frames=3, height=16, width=24)

    def live_at_ffn() -> list[int]:
        mode = LiveStorages(watch=torch.ops.aten.gelu.default)
        with torch.no_grad(), mode:
            model(**inputs)
        return mode.at_watch

    dense = live_at_ffn()
    handle = apply_sparse_attention(
        model, AttentionSpec(density=0.5, block_size=64, tile=(1, 4, 4)), backend="torch")
    sparse = live_at_ffn()  # the first call: it builds the permutation tables
    handle.remove()
    assert len(sparse) == len(dense) == 3  # the text embedder's and each block's
    assert max(sparse) <= max(dense)
