"""apply_sparse_attention on a tiny Wan: dense equality, sparse path, permutation, removal."""

from __future__ import annotations

import pytest
import torch
from diffusers.models.transformers.transformer_wan import WanAttnProcessor

from ditplan.policy.plan import AttentionSpec
from ditplan.runtime.adapters.wan import wan_self_attention_qkv
from ditplan.runtime.apply import apply_sparse_attention
from ditplan.runtime.kernels.block_map import forced_blocks, select_blocks_reference
from ditplan.runtime.kernels.reference import masked_attention_reference
from ditplan.runtime.kernels.remainder import estimated_attention_reference
from tests.factories import run_steps, tiny_wan, tiny_wan_inputs

# 3 frames x 8 x 12 tokens = 288 tokens: 5 blocks of 64 (the last one partial).
GRID_INPUTS = dict(frames=3, height=16, width=24)
BLOCK = 64


def test_dense_steps_equal_diffusers_through_the_static_permutation():
    model, inputs = tiny_wan(), tiny_wan_inputs(**GRID_INPUTS)
    (expected,) = run_steps(model, inputs)
    spec = AttentionSpec(density=0.3, block_size=BLOCK, tile=(1, 4, 4), dense_steps=(0,))
    handle = apply_sparse_attention(model, spec)
    dense_step, sparse_step = run_steps(model, inputs, steps=2)
    handle.remove()
    # Step 0 is a dense warm-up step on permuted tokens: dense attention is permutation-
    # equivariant, so only summation order differs (design D3).
    torch.testing.assert_close(dense_step, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(sparse_step, expected, atol=1e-4)  # step 1 really ran sparse


def test_all_dense_settings_permute_nothing_and_stay_bitwise():
    model, inputs = tiny_wan(), tiny_wan_inputs(**GRID_INPUTS)
    (expected,) = run_steps(model, inputs)
    handle = apply_sparse_attention(model, AttentionSpec(density=1.0, tile=(1, 4, 4)))
    (actual,) = run_steps(model, inputs)
    permute_hooks = [m for m in (model.rope, model.blocks[0], model.proj_out)
                     if m._forward_pre_hooks or m._forward_hooks or hasattr(m, "_diffusers_hook")]
    handle.remove()
    assert torch.equal(actual, expected)
    assert not permute_hooks


def test_remove_restores_model_bitwise():
    model, inputs = tiny_wan(), tiny_wan_inputs(**GRID_INPUTS)
    processors = [b.attn1.processor for b in model.blocks]
    (expected,) = run_steps(model, inputs)
    handle = apply_sparse_attention(model, AttentionSpec(density=0.3, block_size=BLOCK))
    run_steps(model, inputs)
    handle.remove()
    assert [b.attn1.processor for b in model.blocks] == processors
    assert not model._forward_pre_hooks and not model.blocks[0]._forward_pre_hooks
    assert not model.rope._diffusers_hook.hooks and not model.proj_out._forward_hooks
    assert torch.equal(run_steps(model, inputs)[0], expected)


@pytest.mark.parametrize("tile", [(1, 1, 1), (1, 4, 4), (2, 4, 8), (1, 3, 5)])
@pytest.mark.parametrize("backend", ["torch", "dense"])
def test_all_blocks_kept_matches_dense_model_through_permutation(tile, backend):
    """mass_threshold=1.0 keeps every block, so only the permutation and kernels are exercised."""
    model, inputs = tiny_wan(), tiny_wan_inputs(**GRID_INPUTS)
    (expected,) = run_steps(model, inputs)
    spec = AttentionSpec(density=None, mass_threshold=1.0, block_size=BLOCK, tile=tile)
    handle = apply_sparse_attention(model, spec, backend=backend)
    (actual,) = run_steps(model, inputs)
    handle.remove()
    # fp32 on unit-scale activations: summation-order differences stay near 1e-6.
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


def test_in_place_permutation_equals_the_copying_one_and_spares_the_inputs():
    """No grad: hidden states are reordered in place; with grad: copied. Same numbers."""
    model, inputs = tiny_wan(), tiny_wan_inputs(**GRID_INPUTS)
    latents = inputs["hidden_states"].clone()
    handle = apply_sparse_attention(model, AttentionSpec(density=0.4, block_size=BLOCK,
                                                         tile=(1, 4, 4)), backend="torch")
    (in_place,) = run_steps(model, inputs)
    with torch.enable_grad():
        copied = model(**inputs).sample.detach()
    handle.remove()
    assert torch.equal(inputs["hidden_states"], latents)  # the caller's latents are untouched
    torch.testing.assert_close(in_place, copied, rtol=0, atol=0)


# one density; one per head; a dense head beside a sparse one (the compiler's mixed heads:
# density 1.0, the layer still sparse)
@pytest.mark.parametrize("densities", [(0.4, 0.4), (0.2, 0.6), (1.0, 0.2)])
def test_sparse_processor_matches_masked_reference(densities):
    model, inputs = tiny_wan(), tiny_wan_inputs(**GRID_INPUTS)
    attn = model.blocks[0].attn1
    captured = {}
    attn.register_forward_hook(lambda m, args, out: captured.update(args=args, out=out))
    spec = AttentionSpec(
        density=max(densities),
        head_densities=densities,
        block_size=BLOCK,
        tile=(1, 1, 1),
        sink=False,
    )
    handle = apply_sparse_attention(model, {"blocks.0.attn1": spec}, backend="torch")
    run_steps(model, inputs)
    handle.remove()
    hidden_states, _, _, rotary_emb = captured["args"]
    with torch.no_grad():
        q, k, v = wan_self_attention_qkv(attn, hidden_states, rotary_emb)
        diagonal_only = forced_blocks(q.shape[2], BLOCK)  # sink off: only the diagonal is forced
        block_map = select_blocks_reference(
            q, k, block_size=BLOCK, density=densities, forced=diagonal_only
        )
        ref = masked_attention_reference(
            q.double(), k.double(), v.double(), block_map, block_size=BLOCK
        )
        ref = attn.to_out[0](ref.float().transpose(1, 2).flatten(2, 3))
    torch.testing.assert_close(captured["out"], ref, rtol=1e-5, atol=1e-5)


def test_heads_estimating_dropped_blocks_match_the_oracle():
    model, inputs = tiny_wan(), tiny_wan_inputs(**GRID_INPUTS)
    attn = model.blocks[0].attn1
    captured = {}
    attn.register_forward_hook(lambda m, args, out: captured.update(args=args, out=out))
    spec = AttentionSpec(density=0.4, block_size=BLOCK, tile=(1, 1, 1), sink=False,
                         estimate_heads=(True, False))  # head 0 estimates, head 1 does not
    handle = apply_sparse_attention(model, {"blocks.0.attn1": spec}, backend="torch")
    run_steps(model, inputs)
    handle.remove()
    hidden_states, _, _, rotary_emb = captured["args"]
    with torch.no_grad():
        q, k, v = (x.double() for x in wan_self_attention_qkv(attn, hidden_states, rotary_emb))
        block_map = select_blocks_reference(q, k, block_size=BLOCK, density=0.4,
                                            forced=forced_blocks(q.shape[2], BLOCK))
        estimated = estimated_attention_reference(q, k, v, block_map, block_size=BLOCK)
        dropped = masked_attention_reference(q, k, v, block_map, block_size=BLOCK)
        ref = torch.cat([estimated[:, :1], dropped[:, 1:]], dim=1)  # [B, H, S, D]
        ref = attn.to_out[0](ref.float().transpose(1, 2).flatten(2, 3))
        plain = attn.to_out[0](dropped.float().transpose(1, 2).flatten(2, 3))
    torch.testing.assert_close(captured["out"], ref, rtol=1e-5, atol=1e-5)
    assert (captured["out"] - plain).abs().max() > 1e-3  # the estimate changed head 0


def test_cache_context_step_index_drives_dense_steps():
    model, inputs = tiny_wan(), tiny_wan_inputs(**GRID_INPUTS)
    (expected,) = run_steps(model, inputs)
    spec = AttentionSpec(density=0.3, block_size=BLOCK, tile=(1, 4, 4), dense_steps=(4,))
    handle = apply_sparse_attention(model, spec)
    with torch.no_grad(), model.cache_context("uncond", step_index=4):
        at_dense_step = model(**inputs).sample
    with torch.no_grad(), model.cache_context("uncond", step_index=5):
        at_sparse_step = model(**inputs).sample
    handle.remove()
    torch.testing.assert_close(at_dense_step, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(at_sparse_step, expected, atol=1e-4)


def test_counted_steps_wrap_at_num_inference_steps():
    model, inputs = tiny_wan(), tiny_wan_inputs(**GRID_INPUTS)
    (expected,) = run_steps(model, inputs)
    spec = AttentionSpec(density=0.3, block_size=BLOCK, dense_steps=(0,))
    handle = apply_sparse_attention(model, spec, num_inference_steps=2)
    outputs = run_steps(model, inputs, steps=3)  # steps 0, 1, then 0 again (a new generation)
    handle.remove()
    for dense_step in (outputs[0], outputs[2]):
        torch.testing.assert_close(dense_step, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(outputs[1], expected, atol=1e-4)


def test_cross_attention_is_untouched():
    model = tiny_wan()
    handle = apply_sparse_attention(model, AttentionSpec(density=0.5, block_size=BLOCK))
    assert all(isinstance(b.attn2.processor, WanAttnProcessor) for b in model.blocks)
    assert not any(isinstance(b.attn1.processor, WanAttnProcessor) for b in model.blocks)
    handle.remove()


def test_errors_name_the_fix():
    model = tiny_wan()
    with pytest.raises(ValueError, match="blocks.0.attn1"):
        apply_sparse_attention(model, {"blocks.9.attn1": AttentionSpec(density=0.5)})
    with pytest.raises(ValueError, match="same tile"):
        apply_sparse_attention(
            model,
            {
                "blocks.0.attn1": AttentionSpec(density=0.5, tile=(1, 8, 8)),
                "blocks.1.attn1": AttentionSpec(density=0.5, tile=(1, 4, 4)),
            },
        )
    with pytest.raises(ValueError, match="backend"):
        apply_sparse_attention(model, AttentionSpec(density=0.5), backend="cuda-magic")
    with pytest.raises(ValueError, match="no adapter"):
        apply_sparse_attention(torch.nn.Linear(2, 2), AttentionSpec(density=0.5))
    handle = apply_sparse_attention(model, AttentionSpec(density=0.5))
    with pytest.raises(ValueError, match="remove"):
        apply_sparse_attention(model, AttentionSpec(density=0.5))
    handle.remove()


def test_sequence_that_does_not_match_the_latent_grid_is_refused():
    model, inputs = tiny_wan(), tiny_wan_inputs(**GRID_INPUTS)
    handle = apply_sparse_attention(
        model, AttentionSpec(density=0.5, block_size=BLOCK, tile=(1, 1, 1))
    )
    run_steps(model, inputs)  # establishes the 288-token layout
    attn = model.blocks[0].attn1
    with pytest.raises(ValueError, match="288"), torch.no_grad():
        attn(torch.randn(1, 100, attn.inner_dim), None, None, None)
    handle.remove()


@pytest.mark.parametrize("tile, warned", [((1, 4, 4), False), ((3, 4, 4), True)])
def test_a_sink_that_takes_more_than_the_density_is_warned_once(caplog, tile, warned):
    # 3 x 8 x 12 tokens in blocks of 64. One-frame tiles: the first frame's 96 tokens lie in
    # 2 of the 5 blocks, forced rows and columns with the diagonal 0.76 of the block pairs;
    # tiles 3 frames deep put first-frame tokens in 4 blocks, and with the diagonal every pair.
    model, inputs = tiny_wan(), tiny_wan_inputs(**GRID_INPUTS)
    handle = apply_sparse_attention(model, AttentionSpec(density=0.8, block_size=BLOCK,
                                                         tile=tile))
    with caplog.at_level("WARNING", logger="ditplan.runtime.permutation"):
        run_steps(model, inputs, steps=2)
    handle.remove()
    messages = [r.getMessage() for r in caplog.records]
    if not warned:
        assert messages == []
        return
    assert len(messages) == 1  # once per token layout, not per call
    assert "blocks.0.attn1 asks for density 0.8" in messages[0] and "are 1 of" in messages[0]
    assert "first-frame sink" in messages[0] and "--sink off" in messages[0]


def test_call_statistics_are_tensors_and_give_the_achieved_density():
    # A Python int that changes every call is a torch.compile guard: on torch 2.11 (H100) it
    # recompiled the whole model at every step. The counters are tensors.
    model, inputs = tiny_wan(), tiny_wan_inputs(**GRID_INPUTS)
    spec = AttentionSpec(density=0.3, block_size=BLOCK, dense_steps=(0,))
    handle = apply_sparse_attention(model, spec, num_inference_steps=2)
    run_steps(model, inputs, steps=2)  # step 0 dense, step 1 sparse
    layer = handle.layers[0]
    handle.remove()
    counters = (layer.kept_sum, layer.sparse_calls, layer.dense_calls)
    assert all(isinstance(c, torch.Tensor) for c in counters)
    assert float(layer.sparse_calls) == 1 and float(layer.dense_calls) == 1
    kept = float(layer.kept_sum)
    assert 0 < kept < 1
    assert layer.achieved_density() == pytest.approx((kept + 1) / 2)
    layer.reset_stats()
    assert layer.achieved_density() is None


@pytest.mark.parametrize("settings", [dict(head_densities=(0.2, 0.3, 0.4)),
                                      dict(estimate_heads=(True,))])
def test_per_head_settings_for_another_head_count_are_refused_when_applied(settings):
    model = tiny_wan()  # 2 heads
    good = AttentionSpec(density=0.4, block_size=BLOCK)
    bad = AttentionSpec(density=0.4, block_size=BLOCK, **settings)
    before = [block.attn1.processor for block in model.blocks]
    field = next(iter(settings))
    with pytest.raises(ValueError, match=f"blocks.1.attn1: {field} gives .* values but the "
                                         "layer has 2 heads"):  # blocks.0 is fine
        apply_sparse_attention(model, {"blocks.0.attn1": good, "blocks.1.attn1": bad},
                               backend="torch")
    assert [block.attn1.processor for block in model.blocks] == before  # nothing installed


def test_a_plan_with_per_head_settings_for_another_head_count_installs_nothing():
    import dataclasses

    from ditplan.runtime.apply import apply_plan
    from tests.factories import tiny_wan_plan

    model = tiny_wan()
    plan = tiny_wan_plan(model, densities=(0.4, 0.4))
    layer = plan.layers["blocks.1"]
    bad = dataclasses.replace(layer, attention=dataclasses.replace(
        layer.attention, estimate_heads=(True, False, True)))
    plan = dataclasses.replace(plan, layers={**plan.layers, "blocks.1": bad})
    hooks = [len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules()]
    with pytest.raises(ValueError, match="blocks.1.attn1: estimate_heads gives 3 values"):
        apply_plan(model, plan, backend="torch")
    assert [len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules()] == hooks
    assert not hasattr(model, "_diffusers_hook") or not model._diffusers_hook.hooks
