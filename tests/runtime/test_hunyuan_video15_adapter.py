"""The HunyuanVideo-1.5 adapter on a tiny HunyuanVideo15Transformer3DModel: the processor's
dense [B, 1, N, N] mask becomes key padding; layout, runs, refusals (what every joint family
does: test_joint_adapters.py)."""

from __future__ import annotations

import pytest
import torch
from diffusers import ContextParallelConfig
from diffusers.models.attention_processor import AttnProcessor2_0

from ditplan.policy.plan import BlockRun, PlanError
from ditplan.runtime.adapters.base import get_adapter
from ditplan.runtime.apply import apply_plan
from tests.factories import run_steps
from tests.hunyuan_video15_factories import tiny_hunyuan_video15, tiny_hunyuan_video15_inputs
from tests.hunyuan_video_factories import tiny_hunyuan_video
from tests.joint_factories import assert_processor_refused, tiny_joint_plan

# 2 frames of 8 x 12 tokens (192 video tokens) and 7 + 4 + 5 conditioning tokens (Qwen2.5-VL,
# ByT5, image; the 5 image tokens are T2V padding): 208 tokens, 4 blocks of 64, the last mixed.
PADDED = dict(batch=2, valid=(7, 3), valid_byt5=(2, 4))


def test_the_blocks_text_mask_is_suffix_padding_and_becomes_key_valid():
    """The model reorders each text input valid tokens first, so the [B, S_txt] mask the
    blocks receive is suffix padding; key_valid counts video + valid conditioning tokens."""
    model = tiny_hunyuan_video15()
    masks = []
    model.transformer_blocks[0].attn.register_forward_pre_hook(
        lambda module, args, kwargs: masks.append(kwargs["attention_mask"]), with_kwargs=True)
    run_steps(model, tiny_hunyuan_video15_inputs(**PADDED))
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


def test_block_runs_reuse_both_streams():
    model, inputs = tiny_hunyuan_video15(), tiny_hunyuan_video15_inputs(**PADDED)
    run = BlockRun.from_masks(("transformer_blocks.0", "transformer_blocks.1"),
                              {"cond": (True, False)})
    handle = apply_plan(model, tiny_joint_plan(model, density=1.0, runs=[run]), backend="torch")
    computed, reused = run_steps(model, inputs, steps=2, context="cond")
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
    assert_processor_refused(model, "transformer_blocks.1.attn", AttnProcessor2_0(),
                             "transformer_blocks.1.attn runs AttnProcessor2_0")
