"""The HunyuanVideo adapter on a tiny HunyuanVideoTransformer3DModel: the model's key mask as
key padding, refusals, layout (what every joint family does: test_joint_adapters.py)."""

from __future__ import annotations

import pytest
import torch
from diffusers import ContextParallelConfig
from diffusers.models.attention_processor import AttnProcessor2_0

from ditplan.policy.plan import AttentionSpec, PlanError
from ditplan.runtime.adapters.base import get_adapter
from ditplan.runtime.apply import apply_plan, apply_sparse_attention
from tests.factories import run_steps
from tests.hunyuan_video_factories import tiny_hunyuan_video, tiny_hunyuan_video_inputs
from tests.joint_factories import assert_processor_refused, tiny_joint_plan

# 2 frames of 8 x 12 tokens (192 video tokens) and 9 text tokens: 201 tokens, 4 blocks of 64,
# the last one mixed (video and text). Element 1 of a padded batch has 5 valid text tokens.
GRID = dict(frames=2, rows=8, cols=12, text_len=9)
BLOCK = 64
KEEP_ALL = dict(density=None, mass_threshold=1.0, block_size=BLOCK)


def _processor_masks(model, inputs) -> list[torch.Tensor]:
    """The attention_mask each joint attention call receives from the model."""
    masks = []
    hooks = [block.attn.register_forward_pre_hook(
        lambda module, args, kwargs: masks.append(kwargs["attention_mask"]), with_kwargs=True)
        for _, block in get_adapter(model).blocks(model)]
    run_steps(model, inputs)
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
    (expected,) = run_steps(model, inputs)
    handle = apply_sparse_attention(model, AttentionSpec(**KEEP_ALL, tile=(1, 4, 4)),
                                    backend="torch")
    (actual,) = run_steps(model, inputs)
    handle.remove()
    # float rounding of reordered sums only (test_joint_adapters: every block kept == dense)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


def test_parallelism_variants_and_processors_are_refused():
    model = tiny_hunyuan_video()
    with pytest.raises(PlanError, match="not supported for HunyuanVideoTransformer3DModel"):
        apply_plan(model, tiny_joint_plan(model), parallel=ContextParallelConfig(ulysses_degree=2))
    with pytest.raises(ValueError, match="token_replace"):
        apply_sparse_attention(tiny_hunyuan_video(image_condition_type="token_replace"),
                               AttentionSpec(density=0.3))
    assert_processor_refused(model, "single_transformer_blocks.1.attn", AttnProcessor2_0(),
                             "single_transformer_blocks.1.attn runs AttnProcessor2_0")


def test_layout_and_model_config():
    model, inputs = tiny_hunyuan_video(patch_size=2), tiny_hunyuan_video_inputs(**GRID)
    adapter = get_adapter(model)
    layout = adapter.token_layout(model, (), inputs)
    assert (layout.grid, layout.text_len, layout.text_first, layout.video) == (
        (2, 4, 6), 9, False, True)
    config = adapter.model_config(model, 9)
    assert config["patch_size"] == (1, 2, 2) and config["ffn_dim"] == 80
    assert config["blocks"][1:3] == ("transformer_blocks.1", "single_transformer_blocks.0")
