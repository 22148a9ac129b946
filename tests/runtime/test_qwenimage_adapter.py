"""The Qwen-Image adapter on a tiny QwenImageTransformer2DModel: per-branch text lengths, key
padding, refusals (what every joint family does: test_joint_adapters.py)."""

from __future__ import annotations

import pytest
import torch
from diffusers.models.transformers.transformer_qwenimage import QwenEmbedLayer3DRope

from ditplan.policy.plan import AttentionSpec, BlockRun
from ditplan.runtime.adapters.base import get_adapter
from ditplan.runtime.apply import apply_plan, apply_sparse_attention
from tests.factories import run_steps
from tests.joint_factories import tiny_joint_plan
from tests.qwenimage_factories import tiny_qwenimage, tiny_qwenimage_inputs

# A 12 x 20 token image (240 tokens) and 9 text tokens: 249 tokens, 4 blocks of 64, the last
# one mixed (image and text). The uncond branch's prompt is shorter: 5 tokens.
GRID = dict(rows=12, cols=20, text_len=9)
BLOCK = 64
KEEP_ALL = dict(density=None, mass_threshold=1.0, block_size=BLOCK)


def _assert_every_block_kept_equals_dense(branches: dict, tile, backend) -> None:
    """mass_threshold=1.0 keeps every block: each CFG branch's output (``branches``: context ->
    inputs, the two text lengths giving two layouts and two forced-block sets) equals dense."""
    model = tiny_qwenimage()
    expected = {c: run_steps(model, x)[0] for c, x in branches.items()}
    handle = apply_sparse_attention(model, AttentionSpec(**KEEP_ALL, tile=tile), backend=backend)
    actual = {c: run_steps(model, x)[0] for c, x in branches.items()}
    calls = [int(layer.sparse_calls) for layer in handle.layers]
    handle.remove()
    assert calls == [2, 2]
    for context in branches:
        # fp32, unit-scale activations: the same sums over keys in another order (tokens
        # permuted, text moved behind the image) differ by float rounding only (measured
        # <= 5e-7 on outputs up to ~2, <= 6e-7 padded); 1e-5 still catches a misplaced token,
        # and one padding key let through moves outputs by ~1e-2.
        torch.testing.assert_close(actual[context], expected[context], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("tile", "backend"), [((1, 1, 1), "torch"), ((1, 4, 4), "torch"),
                                               ((1, 3, 5), "torch"), ((1, 4, 8), "dense")])
def test_every_block_kept_equals_dense_for_both_text_lengths(tile, backend):
    """cond and uncond prompts of different lengths."""
    _assert_every_block_kept_equals_dense(
        {"cond": tiny_qwenimage_inputs(**GRID),
         "uncond": tiny_qwenimage_inputs(**{**GRID, "text_len": 5}, seed=2)}, tile, backend)


def test_block_runs_keep_each_branchs_text_apart():
    """cond and uncond cache residuals of different text lengths: each branch's reused step
    equals its computed one."""
    model = tiny_qwenimage()
    branches = {"cond": tiny_qwenimage_inputs(**GRID),
                "uncond": tiny_qwenimage_inputs(**{**GRID, "text_len": 5}, seed=2)}
    run = BlockRun.from_masks(("transformer_blocks.0", "transformer_blocks.1"),
                              {"cond": (True, False), "uncond": (True, False)})
    handle = apply_plan(model, tiny_joint_plan(model, density=1.0, cfg=True, runs=[run]),
                        backend="torch")
    outs = {c: [] for c in branches}
    with torch.no_grad():
        for step in range(2):
            for context, inputs in branches.items():
                with model.cache_context(context, step_index=step):
                    outs[context].append(model(**inputs).sample)
    (state,) = handle.runs
    handle.remove()
    assert state.computed_steps == [("cond", 0), ("uncond", 0)]
    for computed, reused in outs.values():
        torch.testing.assert_close(reused, computed, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(("tile", "backend"), [((1, 1, 1), "torch"), ((1, 4, 4), "torch"),
                                               ((1, 3, 5), "dense")])
def test_padded_batches_with_every_block_kept_equal_dense(tile, backend):
    """Batches of prompts padded to the longest (suffix padding, pipeline_qwenimage.py:
    212-218), cond and uncond of different text lengths: the padding keys reach the kernels as
    key_valid [B] and are masked as diffusers' [B, 1, 1, N] mask masks them."""
    _assert_every_block_kept_equals_dense(
        {"cond": tiny_qwenimage_inputs(**GRID, batch=2, valid=(9, 5)),
         "uncond": tiny_qwenimage_inputs(**{**GRID, "text_len": 6}, batch=2, valid=(2, 6),
                                         seed=2)}, tile, backend)


def test_a_padded_element_equals_its_prompt_alone_and_key_valid_counts_its_keys():
    """The padded element's output differs from its unpadded twin's only through the padding
    keys: with them masked, element 1 (5 valid of 9) equals the same prompt cut to 5 tokens."""
    model = tiny_qwenimage()
    padded = tiny_qwenimage_inputs(**GRID, batch=2, valid=(9, 5))
    cut = {**padded, "hidden_states": padded["hidden_states"][1:],
           "encoder_hidden_states": padded["encoder_hidden_states"][1:, :5],
           "timestep": padded["timestep"][1:], "img_shapes": padded["img_shapes"][1:]}
    del cut["encoder_hidden_states_mask"]
    handle = apply_sparse_attention(model, AttentionSpec(**KEEP_ALL, tile=(1, 4, 4)),
                                    backend="torch")
    (both,) = run_steps(model, padded)
    (alone,) = run_steps(model, cut)
    handle.remove()
    torch.testing.assert_close(both[1:], alone, rtol=1e-5, atol=1e-5)  # rounding, as above
    attn = model.transformer_blocks[0].attn
    hidden = torch.randn(2, 240, attn.inner_dim)
    mask = padded["encoder_hidden_states_mask"]
    assert torch.equal(mask, torch.arange(9) < mask.sum(1, keepdim=True))  # suffix padding
    call = get_adapter(model).attention_call(attn, None, hidden, torch.randn(2, 9, attn.inner_dim),
                                             mask)
    assert call.key_valid.tolist() == [240 + 9, 240 + 5]  # [image | valid text]


def test_unsupported_inputs_and_variants_are_refused():
    model, inputs = tiny_qwenimage(), tiny_qwenimage_inputs(**GRID)
    handle = apply_sparse_attention(model, AttentionSpec(density=0.3, block_size=BLOCK))
    two_images = [[(1, 12, 10), (1, 12, 10)]]  # an edit model's reference image + output
    with pytest.raises(ValueError, match="one \\(1, rows, cols\\) image"):
        run_steps(model, {**inputs, "img_shapes": two_images})
    handle.remove()
    with pytest.raises(ValueError, match="zero_cond_t"):
        apply_sparse_attention(tiny_qwenimage(zero_cond_t=True), AttentionSpec(density=0.3))
    layered = tiny_qwenimage(use_layer3d_rope=True)
    assert isinstance(layered.pos_embed, QwenEmbedLayer3DRope)
    with pytest.raises(ValueError, match="QwenEmbedLayer3DRope"):
        apply_sparse_attention(layered, AttentionSpec(density=0.3))
