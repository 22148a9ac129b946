"""The HunyuanVideo-1.5 adapter on a tiny HunyuanVideo15Transformer3DModel: the processor's
dense [B, 1, N, N] mask becomes key padding; dense, sparse, removal, refusals."""

from __future__ import annotations

import pytest
import torch
from diffusers import ContextParallelConfig
from diffusers.models.attention_processor import AttnProcessor2_0

from ditplan.policy.plan import AttentionSpec, BlockRun, PlanError
from ditplan.runtime.adapters.base import get_adapter
from ditplan.runtime.apply import apply_plan, apply_sparse_attention
from tests.hunyuan_video15_factories import tiny_hunyuan_video15, tiny_hunyuan_video15_inputs
from tests.hunyuan_video_factories import tiny_hunyuan_video
from tests.joint_factories import tiny_joint_plan

# 2 frames of 8 x 12 tokens (192 video tokens) and 7 + 4 + 5 conditioning tokens (Qwen2.5-VL,
# ByT5, image; the 5 image tokens are T2V padding): 208 tokens, 4 blocks of 64, the last mixed.
PADDED = dict(batch=2, valid=(7, 3), valid_byt5=(2, 4))
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
    model, inputs = tiny_hunyuan_video15(), tiny_hunyuan_video15_inputs(**PADDED)
    (expected,) = _run(model, inputs)
    spec = AttentionSpec(density=0.3, block_size=BLOCK, tile=(1, 1, 1), sink=False,
                         dense_steps=(0,))  # a first-frame sink would force every block here
    handle = apply_sparse_attention(model, spec, backend="torch")
    dense_step, sparse_step = _run(model, inputs, steps=2)
    densities = [layer.achieved_density() for layer in handle.layers]
    handle.remove()
    assert torch.equal(dense_step, expected)
    assert len(densities) == 2 and all(d < 1.0 for d in densities)
    assert not torch.allclose(sparse_step, expected, atol=1e-4)  # step 1 really ran sparse


@pytest.mark.parametrize(("tile", "backend", "padding"), [
    ((1, 1, 1), "torch", PADDED), ((1, 4, 4), "torch", PADDED), ((2, 4, 4), "dense", PADDED),
    ((1, 3, 5), "torch", {})])
def test_every_block_kept_equals_dense_with_key_padding(tile, backend, padding):
    """mass_threshold=1.0 keeps every block. The original masks padding queries too (rows of
    its dense mask); only padding tokens' outputs differ, and no valid token reads them."""
    model, inputs = tiny_hunyuan_video15(), tiny_hunyuan_video15_inputs(**padding)
    (expected,) = _run(model, inputs)
    handle = apply_sparse_attention(model, AttentionSpec(**KEEP_ALL, tile=tile), backend=backend)
    (actual,) = _run(model, inputs)
    sparse_calls = [int(layer.sparse_calls) for layer in handle.layers]
    handle.remove()
    assert sparse_calls == [1, 1]
    # fp32, unit-scale activations: float rounding of reordered sums (measured <= 5e-7 on
    # outputs up to ~2); a padding key let through moves outputs by >= 1e-2.
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


def test_the_blocks_text_mask_is_suffix_padding_and_becomes_key_valid():
    """The model reorders each text input valid tokens first, so the [B, S_txt] mask the
    blocks receive is suffix padding; key_valid counts video + valid conditioning tokens."""
    model = tiny_hunyuan_video15()
    masks = []
    model.transformer_blocks[0].attn.register_forward_pre_hook(
        lambda module, args, kwargs: masks.append(kwargs["attention_mask"]), with_kwargs=True)
    _run(model, tiny_hunyuan_video15_inputs(**PADDED))
    (mask,) = masks
    assert mask.shape == (2, 16)
    assert torch.equal(mask, torch.arange(16) < mask.sum(1, keepdim=True))  # suffix
    attn = model.transformer_blocks[0].attn
    call = get_adapter(model).attention_call(attn, None, torch.randn(2, 192, 16),
                                             torch.randn(2, 16, 16), mask)
    assert call.key_valid.tolist() == [192 + 7 + 2, 192 + 3 + 4]  # image tokens: T2V padding


def test_layout_counts_every_conditioning_input():
    model, inputs = tiny_hunyuan_video15(), tiny_hunyuan_video15_inputs()
    adapter = get_adapter(model)
    layout = adapter.token_layout(model, (), inputs)
    assert (layout.grid, layout.text_len, layout.text_first) == ((2, 8, 12), 16, False)
    assert adapter.model_config(model, 16)["ffn_dim"] == 32


def test_remove_restores_the_model_exactly():
    model, inputs = tiny_hunyuan_video15(), tiny_hunyuan_video15_inputs(**PADDED)
    processors = [block.attn.processor for block in model.transformer_blocks]
    (expected,) = _run(model, inputs)
    handle = apply_sparse_attention(model, AttentionSpec(density=0.3, block_size=BLOCK,
                                                         tile=(1, 4, 4)))
    _run(model, inputs)
    handle.remove()
    assert [block.attn.processor for block in model.transformer_blocks] == processors
    assert not model._forward_pre_hooks and not model.proj_out._forward_hooks
    assert not model.rope._diffusers_hook.hooks
    assert torch.equal(_run(model, inputs)[0], expected)


def test_block_runs_reuse_both_streams():
    model, inputs = tiny_hunyuan_video15(), tiny_hunyuan_video15_inputs(**PADDED)
    run = BlockRun.from_masks(("transformer_blocks.0", "transformer_blocks.1"),
                              {"cond": (True, False)})
    handle = apply_plan(model, tiny_joint_plan(model, density=1.0, runs=[run]), backend="torch")
    computed, reused = _run(model, inputs, steps=2, context="cond")
    stats = handle.stats()
    handle.remove()
    assert stats["blocks_skipped_share"] == pytest.approx(2 / 4)
    torch.testing.assert_close(reused, computed, rtol=1e-6, atol=1e-6)


def test_plans_parallelism_and_processors_are_refused():
    model, other = tiny_hunyuan_video15(), tiny_hunyuan_video()
    with pytest.raises(PlanError, match="plan is for a HunyuanVideoTransformer3DModel, this "
                                        "model is a HunyuanVideo15Transformer3DModel"):
        apply_plan(model, tiny_joint_plan(other))
    with pytest.raises(PlanError, match="not supported for HunyuanVideo15Transformer3DModel"):
        apply_plan(model, tiny_joint_plan(model), parallel=ContextParallelConfig(ulysses_degree=2))
    attn = model.transformer_blocks[1].attn
    original = attn.processor
    attn.set_processor(AttnProcessor2_0())
    with pytest.raises(ValueError, match="transformer_blocks.1.attn runs AttnProcessor2_0"):
        apply_sparse_attention(model, AttentionSpec(density=0.3, block_size=BLOCK))
    attn.set_processor(original)
