"""The FLUX.1 adapter on a tiny FluxTransformer2DModel: dense, sparse, removal, refusals."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from diffusers.models.transformers.transformer_flux import FluxIPAdapterAttnProcessor

from ditplan.policy.plan import AttentionSpec, BlockRun, PlanError
from ditplan.runtime.apply import apply_plan, apply_sparse_attention
from ditplan.runtime.layout import TokenLayout
from ditplan.runtime.permutation import TokenPermuter
from tests.factories import tiny_wan, tiny_wan_plan
from tests.flux_factories import image_ids, tiny_flux, tiny_flux_inputs
from tests.joint_factories import tiny_joint_plan

# A 12 x 20 token image (240 tokens) and 9 text tokens: 249 tokens, 4 blocks of 64; the last
# block holds image and text tokens (the mixed boundary block).
GRID = dict(rows=12, cols=20, text_len=9)
BLOCK = 64


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
    model, inputs = tiny_flux(), tiny_flux_inputs(**GRID)
    (expected,) = _run(model, inputs)
    spec = AttentionSpec(density=0.3, block_size=BLOCK, tile=(1, 1, 1), dense_steps=(0,))
    handle = apply_sparse_attention(model, spec, backend="torch")
    dense_step, sparse_step = _run(model, inputs, steps=2)
    densities = [layer.achieved_density() for layer in handle.layers]
    handle.remove()
    assert torch.equal(dense_step, expected)
    assert len(densities) == 4 and all(d < 1.0 for d in densities)  # dual and single blocks
    assert not torch.allclose(sparse_step, expected, atol=1e-4)  # step 1 really ran sparse


@pytest.mark.parametrize("tile", [(1, 1, 1), (1, 4, 4), (1, 4, 8), (1, 3, 5)])
@pytest.mark.parametrize("backend", ["torch", "dense"])
def test_every_block_kept_equals_dense_through_the_permutation(tile, backend):
    """mass_threshold=1.0 keeps every block: only the permutation, the canonical order
    [image tiles | text] and the kernels are exercised."""
    model, inputs = tiny_flux(), tiny_flux_inputs(**GRID)
    (expected,) = _run(model, inputs)
    spec = AttentionSpec(density=None, mass_threshold=1.0, block_size=BLOCK, tile=tile)
    handle = apply_sparse_attention(model, spec, backend=backend)
    (actual,) = _run(model, inputs)
    sparse_calls = [int(layer.sparse_calls) for layer in handle.layers]
    handle.remove()
    assert sparse_calls == [1, 1, 1, 1]
    # fp32, unit-scale activations, 4 blocks: the same sums over keys in another order (tokens
    # permuted, text moved behind the image) differ by float rounding only; measured <= 4e-7
    # on outputs of magnitude ~1, so 1e-5 leaves 25x margin and still catches a wrong token.
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


def test_fused_projections_take_the_same_path():
    model, inputs = tiny_flux(), tiny_flux_inputs(**GRID)
    model.fuse_qkv_projections()  # to_qkv and to_added_qkv instead of separate projections
    (expected,) = _run(model, inputs)
    spec = AttentionSpec(density=None, mass_threshold=1.0, block_size=BLOCK, tile=(1, 4, 4))
    handle = apply_sparse_attention(model, spec, backend="torch")
    (actual,) = _run(model, inputs)
    handle.remove()
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)  # as above


def test_caller_inputs_are_not_permuted():
    model, inputs = tiny_flux(), tiny_flux_inputs(**GRID)
    saved = {k: v.clone() for k, v in inputs.items()}
    handle = apply_sparse_attention(model, AttentionSpec(density=0.3, block_size=BLOCK,
                                                         tile=(1, 4, 4)))
    _run(model, inputs)
    handle.remove()
    assert all(torch.equal(inputs[k], saved[k]) for k in saved)


def test_image_layout_forces_text_both_ways_and_has_no_sink():
    layout = TokenLayout(1, 12, 20, text_len=9, text_first=True, video=False)
    permuter = TokenPermuter((1, 4, 4))
    permuter.begin(layout, torch.device("cpu"))
    sink, text = permuter.token_masks()
    forced = permuter.forced(BLOCK, sink=True)
    assert not sink.any()  # an image has no first-frame sink, whatever the spec says
    assert text.nonzero().flatten().tolist() == list(range(240, 249))  # text after the image
    assert forced.rows.tolist() == [False, False, False, True]  # text-to-all
    assert forced.cols.tolist() == [False, False, False, True]  # all-to-text
    with pytest.raises(ValueError, match="one frame"):
        TokenLayout(2, 12, 20, video=False)


def test_remove_restores_the_model_exactly():
    model, inputs = tiny_flux(), tiny_flux_inputs(**GRID)
    attention = [block.attn for block in (*model.transformer_blocks,
                                          *model.single_transformer_blocks)]
    processors = [attn.processor for attn in attention]
    (expected,) = _run(model, inputs)
    handle = apply_sparse_attention(model, AttentionSpec(density=0.3, block_size=BLOCK,
                                                         tile=(1, 4, 4)))
    _run(model, inputs)
    handle.remove()
    assert [attn.processor for attn in attention] == processors
    assert not model._forward_pre_hooks and not model.proj_out._forward_hooks
    assert torch.equal(_run(model, inputs)[0], expected)


def _attention_calls(model, names):
    calls = dict.fromkeys(names, 0)
    for name in names:
        def count(module, args, output, name=name):
            calls[name] += 1
        model.get_submodule(f"{name}.attn").register_forward_hook(count)
    return calls


def test_a_run_across_the_dual_single_boundary_caches_both_streams():
    """The run's text residual matters: single_transformer_blocks.1, after the run, reads
    the text stream. With the same inputs at both steps, the reused step equals the computed
    one (to the rounding of input + (output - input))."""
    model, inputs = tiny_flux(), tiny_flux_inputs(**GRID)
    run = ("transformer_blocks.1", "single_transformer_blocks.0")
    plan = tiny_joint_plan(model, density=1.0, runs=[
        BlockRun.from_masks(run, {"cond": (True, False)})])
    handle = apply_plan(model, plan, backend="torch")
    calls = _attention_calls(model, run)
    computed, reused = _run(model, inputs, steps=2, context="cond")
    stats = handle.stats()
    handle.remove()
    assert calls == dict.fromkeys(run, 1)  # not called at the reused step
    assert stats["blocks_skipped_share"] == pytest.approx(2 / 8)
    torch.testing.assert_close(reused, computed, rtol=1e-6, atol=1e-6)


def test_batched_cfg_with_one_branch_reused_slices_both_streams():
    """Batched CFG (uncond, cond) at step 1: uncond reuses, cond computes on its half."""
    model = tiny_flux()
    inputs = tiny_flux_inputs(**GRID, batch=2)
    run = ("transformer_blocks.0", "transformer_blocks.1")
    plan = tiny_joint_plan(model, density=1.0, cfg=True, runs=[
        BlockRun.from_masks(run, {"cond": (True, True), "uncond": (True, False)})])
    handle = apply_plan(model, plan, backend="torch", cfg_batch_order=("uncond", "cond"))
    batches = []
    model.transformer_blocks[0].attn.register_forward_hook(
        lambda module, args, output: batches.append(output[0].shape[0]))  # image [b, S, C]
    first, second = _run(model, inputs, steps=2)
    handle.remove()
    assert batches == [2, 1]
    torch.testing.assert_close(second, first, rtol=1e-6, atol=1e-6)


def test_plans_refuse_another_family():
    flux, wan = tiny_flux(), tiny_wan()
    with pytest.raises(PlanError, match="plan is for a WanTransformer3DModel, this model is a "
                                        "FluxTransformer2DModel"):
        apply_plan(flux, tiny_wan_plan(wan))
    with pytest.raises(PlanError, match="plan is for a FluxTransformer2DModel, this model is a "
                                        "WanTransformer3DModel"):
        apply_plan(wan, tiny_joint_plan(flux))
    other = tiny_flux(num_single_layers=3)
    with pytest.raises(PlanError, match="another FluxTransformer2DModel configuration"):
        apply_plan(other, tiny_joint_plan(flux))


def test_inputs_ditplan_cannot_tile_are_refused_clearly():
    model, inputs = tiny_flux(), tiny_flux_inputs(**GRID)
    handle = apply_sparse_attention(model, AttentionSpec(density=0.3, block_size=BLOCK))
    shuffled = image_ids(12, 20)[torch.randperm(240)]
    with pytest.raises(ValueError, match="raster order"):
        _run(model, {**inputs, "img_ids": shuffled})
    for ids in ("img_ids", "txt_ids"):
        with pytest.raises(ValueError, match="the 2-D forms"):
            _run(model, {**inputs, ids: inputs[ids][None]})
    with pytest.raises(ValueError, match="ControlNet"):
        _run(model, {**inputs, "controlnet_block_samples": [inputs["hidden_states"]]})
    handle.remove()


def test_unsupported_processors_are_refused():
    model = tiny_flux()
    attn = model.single_transformer_blocks[1].attn
    original = attn.processor
    attn.set_processor(FluxIPAdapterAttnProcessor(
        hidden_size=32, cross_attention_dim=32, num_tokens=(4,), scale=(1.0,)))
    with pytest.raises(ValueError, match="single_transformer_blocks.1.attn runs "
                                         "FluxIPAdapterAttnProcessor.*IP-Adapter"):
        apply_sparse_attention(model, AttentionSpec(density=0.3, block_size=BLOCK))
    attn.set_processor(original)  # refused before anything was installed
    apply_sparse_attention(model, AttentionSpec(density=0.3, block_size=BLOCK)).remove()


def test_other_grid_is_refused():
    model = tiny_flux()
    plan = tiny_joint_plan(model)
    plan = replace(plan, workload=replace(plan.workload, tokens_grid=(1, 12, 16)))
    handle = apply_plan(model, plan, backend="torch")
    with pytest.raises(ValueError, match=r"\(1, 12, 16\) token grid"):
        _run(model, tiny_flux_inputs(**GRID), context="cond")
    handle.remove()
