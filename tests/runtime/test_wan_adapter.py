"""The Wan adapter (interface v2): processor signature, per-token timesteps, experts."""

from __future__ import annotations

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
