"""The FLUX.1 adapter on a tiny FluxTransformer2DModel: fused projections, the image layout, batched
CFG runs, refusals (what every joint family does: test_joint_adapters.py)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from diffusers.models.transformers.transformer_flux import FluxIPAdapterAttnProcessor

from ditplan.policy.plan import AttentionSpec, BlockRun, PlanError
from ditplan.runtime.apply import apply_plan, apply_sparse_attention
from ditplan.runtime.layout import TokenLayout
from ditplan.runtime.permutation import TokenPermuter
from tests.factories import run_steps, tiny_wan, tiny_wan_plan
from tests.flux_factories import image_ids, tiny_flux, tiny_flux_inputs
from tests.joint_factories import assert_processor_refused, tiny_joint_plan

# A 12 x 20 token image (240 tokens) and 9 text tokens: 249 tokens, 4 blocks of 64; the last
# block holds image and text tokens (the mixed boundary block).
GRID = dict(rows=12, cols=20, text_len=9)
BLOCK = 64


def test_fused_projections_take_the_same_path():
    model, inputs = tiny_flux(), tiny_flux_inputs(**GRID)
    model.fuse_qkv_projections()  # to_qkv and to_added_qkv instead of separate projections
    (expected,) = run_steps(model, inputs)
    spec = AttentionSpec(density=None, mass_threshold=1.0, block_size=BLOCK, tile=(1, 4, 4))
    handle = apply_sparse_attention(model, spec, backend="torch")
    (actual,) = run_steps(model, inputs)
    handle.remove()
    # float rounding of reordered sums only (test_joint_adapters: every block kept == dense)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


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
    first, second = run_steps(model, inputs, steps=2)
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
        run_steps(model, {**inputs, "img_ids": shuffled})
    for ids in ("img_ids", "txt_ids"):
        with pytest.raises(ValueError, match="the 2-D forms"):
            run_steps(model, {**inputs, ids: inputs[ids][None]})
    with pytest.raises(ValueError, match="ControlNet"):
        run_steps(model, {**inputs, "controlnet_block_samples": [inputs["hidden_states"]]})
    handle.remove()


def test_unsupported_processors_are_refused():
    ip_adapter = FluxIPAdapterAttnProcessor(hidden_size=32, cross_attention_dim=32,
                                            num_tokens=(4,), scale=(1.0,))
    assert_processor_refused(tiny_flux(), "single_transformer_blocks.1.attn", ip_adapter,
                             "single_transformer_blocks.1.attn runs "
                             "FluxIPAdapterAttnProcessor.*IP-Adapter")


def test_other_grid_is_refused():
    model = tiny_flux()
    plan = tiny_joint_plan(model)
    plan = replace(plan, workload=replace(plan.workload, tokens_grid=(1, 12, 16)))
    handle = apply_plan(model, plan, backend="torch")
    with pytest.raises(ValueError, match=r"\(1, 12, 16\) token grid"):
        run_steps(model, tiny_flux_inputs(**GRID), context="cond")
    handle.remove()
