"""The HunyuanVideo adapter on a tiny HunyuanVideoTransformer3DModel: dense, sparse with key
padding, runs across the dual -> single boundary, removal, refusals."""

from __future__ import annotations

import pytest
import torch
from diffusers import ContextParallelConfig
from diffusers.models.attention_processor import AttnProcessor2_0

from ditplan.policy.plan import AttentionSpec, BlockRun, PlanError
from ditplan.runtime.adapters.base import get_adapter
from ditplan.runtime.apply import apply_plan, apply_sparse_attention
from tests.flux_factories import tiny_flux
from tests.hunyuan_video_factories import tiny_hunyuan_video, tiny_hunyuan_video_inputs
from tests.joint_factories import tiny_joint_plan

# 2 frames of 8 x 12 tokens (192 video tokens) and 9 text tokens: 201 tokens, 4 blocks of 64,
# the last one mixed (video and text). Element 1 of a padded batch has 5 valid text tokens.
GRID = dict(frames=2, rows=8, cols=12, text_len=9)
BLOCK = 64
KEEP_ALL = dict(density=None, mass_threshold=1.0, block_size=BLOCK)


def _run(model, inputs, steps=1, context=None):
    outs = []
    with torch.no_grad():
        for step in range(steps):
            if context is None:
                outs.append(model(**inputs).sample)
            else:
                with model.cache_context(context, step_index=step):
                    outs.append(model(**inputs).sample)
    return outs


def test_dense_steps_equal_diffusers_bitwise():
    """Without a tile nothing is permuted: a dense step runs diffusers' own processor."""
    model, inputs = tiny_hunyuan_video(), tiny_hunyuan_video_inputs(**GRID)
    (expected,) = _run(model, inputs)
    spec = AttentionSpec(density=0.3, block_size=BLOCK, tile=(1, 1, 1), sink=False,
                         dense_steps=(0,))  # a first-frame sink would force every block here
    handle = apply_sparse_attention(model, spec, backend="torch")
    dense_step, sparse_step = _run(model, inputs, steps=2)
    densities = [layer.achieved_density() for layer in handle.layers]
    handle.remove()
    assert torch.equal(dense_step, expected)
    assert len(densities) == 4 and all(d < 1.0 for d in densities)  # dual and single blocks
    assert not torch.allclose(sparse_step, expected, atol=1e-4)  # step 1 really ran sparse


@pytest.mark.parametrize(("tile", "backend", "valid"), [
    ((1, 1, 1), "torch", (9, 5)), ((1, 4, 4), "torch", (9,)), ((1, 4, 4), "torch", (9, 5)),
    ((2, 4, 4), "dense", (9, 5)), ((1, 3, 5), "torch", (9, 5)), ((1, 3, 5), "dense", (9,))])
def test_every_block_kept_equals_dense_with_key_padding(tile, backend, valid):
    """mass_threshold=1.0 keeps every block: the permutation (video rows and rotary rows), the
    canonical order [video tiles | text] and the key padding are exercised. The model always
    passes its key mask, so the op always gets key_valid, padded (9, 5) or not (9,)."""
    model = tiny_hunyuan_video()
    inputs = tiny_hunyuan_video_inputs(**GRID, batch=len(valid), valid=valid)
    (expected,) = _run(model, inputs)
    handle = apply_sparse_attention(model, AttentionSpec(**KEEP_ALL, tile=tile), backend=backend)
    (actual,) = _run(model, inputs)
    sparse_calls = [int(layer.sparse_calls) for layer in handle.layers]
    handle.remove()
    assert sparse_calls == [1, 1, 1, 1]
    # fp32, unit-scale activations: the same sums over keys in another order (tokens permuted)
    # differ by float rounding only (measured <= 5e-7 on outputs up to ~2.1); the padding keys
    # let through (key_valid dropped) moved them by 1.5e-2.
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


def _processor_masks(model, inputs) -> list[torch.Tensor]:
    """The attention_mask each joint attention call receives from the model."""
    masks = []
    hooks = [block.attn.register_forward_pre_hook(
        lambda module, args, kwargs: masks.append(kwargs["attention_mask"]), with_kwargs=True)
        for _, block in get_adapter(model).blocks(model)]
    _run(model, inputs)
    for hook in hooks:
        hook.remove()
    return masks


def test_the_models_mask_is_suffix_padding_whatever_the_text_mask():
    """The model turns encoder_attention_mask into a [B, 1, 1, N] key mask of suffix form by
    counting (transformer_hunyuan_video.py:1054-1062), even for zeros inside the text mask;
    key_valid is that count, and sparse with every block kept equals dense."""
    model = tiny_hunyuan_video()
    inputs = tiny_hunyuan_video_inputs(**GRID, batch=2, valid=(9, 5))
    holes = inputs["encoder_attention_mask"].clone()
    holes[0, 2], holes[1, 0] = 0, 0  # zeros not at the end: 8 and 4 valid
    inputs["encoder_attention_mask"] = holes
    adapter = get_adapter(model)
    for mask in _processor_masks(model, inputs):
        key_valid = adapter.attention_call(
            model.transformer_blocks[0].attn, None, torch.randn(2, 192, 20),
            torch.randn(2, 9, 20), mask).key_valid
        assert key_valid.tolist() == [192 + 8, 192 + 4]
        assert torch.equal(mask[:, 0, 0], torch.arange(201) < key_valid[:, None])  # suffix
    (expected,) = _run(model, inputs)
    handle = apply_sparse_attention(model, AttentionSpec(**KEEP_ALL, tile=(1, 4, 4)),
                                    backend="torch")
    (actual,) = _run(model, inputs)
    handle.remove()
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)  # as above


def test_caller_inputs_are_not_permuted():
    model, inputs = tiny_hunyuan_video(), tiny_hunyuan_video_inputs(**GRID)
    saved = {k: v.clone() for k, v in inputs.items()}
    handle = apply_sparse_attention(model, AttentionSpec(density=0.3, block_size=BLOCK,
                                                         tile=(1, 4, 4)))
    _run(model, inputs)
    handle.remove()
    assert all(torch.equal(inputs[k], saved[k]) for k in saved)


def test_remove_restores_the_model_exactly():
    model, inputs = tiny_hunyuan_video(), tiny_hunyuan_video_inputs(**GRID)
    attention = [block.attn for _, block in get_adapter(model).blocks(model)]
    processors = [attn.processor for attn in attention]
    (expected,) = _run(model, inputs)
    handle = apply_sparse_attention(model, AttentionSpec(density=0.3, block_size=BLOCK,
                                                         tile=(1, 4, 4)))
    _run(model, inputs)
    handle.remove()
    assert [attn.processor for attn in attention] == processors
    assert not model._forward_pre_hooks and not model.proj_out._forward_hooks
    assert not model.transformer_blocks[0]._forward_pre_hooks
    assert not model.rope._diffusers_hook.hooks
    assert torch.equal(_run(model, inputs)[0], expected)


def test_a_run_across_the_dual_single_boundary_caches_both_streams():
    """single_transformer_blocks.1, after the run, reads both streams (it concatenates them):
    with the same inputs at both steps the reused step equals the computed one."""
    model, inputs = tiny_hunyuan_video(), tiny_hunyuan_video_inputs(**GRID, batch=2,
                                                                     valid=(9, 5))
    run = ("transformer_blocks.1", "single_transformer_blocks.0")
    plan = tiny_joint_plan(model, density=1.0, runs=[
        BlockRun.from_masks(run, {"cond": (True, False)})])
    handle = apply_plan(model, plan, backend="torch")
    calls = dict.fromkeys(run, 0)
    for name in run:
        model.get_submodule(f"{name}.attn").register_forward_hook(
            lambda module, args, output, name=name: calls.__setitem__(name, calls[name] + 1))
    computed, reused = _run(model, inputs, steps=2, context="cond")
    stats = handle.stats()
    handle.remove()
    assert calls == dict.fromkeys(run, 1)  # not called at the reused step
    assert stats["blocks_skipped_share"] == pytest.approx(2 / 8)
    torch.testing.assert_close(reused, computed, rtol=1e-6, atol=1e-6)


def test_plans_refuse_another_family():
    hunyuan, flux = tiny_hunyuan_video(), tiny_flux()
    with pytest.raises(PlanError, match="plan is for a FluxTransformer2DModel, this model is a "
                                        "HunyuanVideoTransformer3DModel"):
        apply_plan(hunyuan, tiny_joint_plan(flux))
    with pytest.raises(PlanError, match="plan is for a HunyuanVideoTransformer3DModel"):
        apply_plan(flux, tiny_joint_plan(hunyuan))


def test_parallelism_variants_and_processors_are_refused():
    model = tiny_hunyuan_video()
    with pytest.raises(PlanError, match="not supported for HunyuanVideoTransformer3DModel"):
        apply_plan(model, tiny_joint_plan(model), parallel=ContextParallelConfig(ulysses_degree=2))
    with pytest.raises(ValueError, match="token_replace"):
        apply_sparse_attention(tiny_hunyuan_video(image_condition_type="token_replace"),
                               AttentionSpec(density=0.3))
    attn = model.single_transformer_blocks[1].attn
    original = attn.processor
    attn.set_processor(AttnProcessor2_0())
    with pytest.raises(ValueError, match="single_transformer_blocks.1.attn runs "
                                         "AttnProcessor2_0"):
        apply_sparse_attention(model, AttentionSpec(density=0.3, block_size=BLOCK))
    attn.set_processor(original)  # refused before anything was installed
    apply_sparse_attention(model, AttentionSpec(density=0.3, block_size=BLOCK)).remove()


def test_layout_and_model_config():
    model, inputs = tiny_hunyuan_video(patch_size=2), tiny_hunyuan_video_inputs(**GRID)
    adapter = get_adapter(model)
    layout = adapter.token_layout(model, (), inputs)
    assert (layout.grid, layout.text_len, layout.text_first, layout.video) == (
        (2, 4, 6), 9, False, True)
    config = adapter.model_config(model, 9)
    assert config["patch_size"] == (1, 2, 2) and config["ffn_dim"] == 80
    assert config["blocks"][1:3] == ("transformer_blocks.1", "single_transformer_blocks.0")
