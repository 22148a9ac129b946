"""What every joint-attention adapter (FLUX.1, Qwen-Image, HunyuanVideo, HunyuanVideo-1.5) must
do, on its tiny transformer: dense steps bitwise, every block kept == dense, exact removal,
runs, refusals. Each family's own behaviour is tested in its test_<family>_adapter.py."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch

from ditplan.policy.plan import AttentionSpec, BlockRun, PlanError
from ditplan.runtime.adapters.base import get_adapter
from ditplan.runtime.apply import apply_plan, apply_sparse_attention
from tests.factories import run_steps
from tests.flux_factories import tiny_flux, tiny_flux_inputs
from tests.hunyuan_video15_factories import tiny_hunyuan_video15, tiny_hunyuan_video15_inputs
from tests.hunyuan_video_factories import tiny_hunyuan_video, tiny_hunyuan_video_inputs
from tests.joint_factories import count_attention_calls, tiny_joint_plan
from tests.qwenimage_factories import tiny_qwenimage, tiny_qwenimage_inputs

BLOCK = 64
KEEP_ALL = dict(density=None, mass_threshold=1.0, block_size=BLOCK)
# A 12 x 20 token image (240 tokens) and 9 text tokens: 249 tokens.
IMAGE_GRID = dict(rows=12, cols=20, text_len=9)
# 2 frames of 8 x 12 tokens (192 video tokens) and 9 text tokens: 201 tokens.
HUNYUAN_GRID = dict(frames=2, rows=8, cols=12, text_len=9)
# 192 video tokens and 7 + 4 + 5 conditioning tokens (Qwen2.5-VL, ByT5, image; the image ones
# T2V padding): 208 tokens, two prompts padded.
HV15_PADDED = dict(batch=2, valid=(7, 3), valid_byt5=(2, 4))


@dataclass(frozen=True)
class Family:
    """A family's tiny transformer, its test inputs and what the checks expect of them."""

    model: Callable
    inputs: Callable  # (**overrides) -> forward inputs
    grid: dict  # the inputs' keywords: 4 token blocks of 64, the last mixed (text and not)
    attention_layers: int
    sink: bool  # the dense-step spec's sink: off for videos, where it would force every block
    rotary: str | None  # the module whose rotary tables ditplan permutes through a diffusers hook


FAMILIES = {
    "flux": Family(tiny_flux, tiny_flux_inputs, IMAGE_GRID, 4, sink=True,
                   rotary=None),  # the rotary table is built from the permuted img_ids
    "qwenimage": Family(tiny_qwenimage, tiny_qwenimage_inputs, IMAGE_GRID, 2, sink=True,
                        rotary="pos_embed"),
    "hunyuan_video": Family(tiny_hunyuan_video, tiny_hunyuan_video_inputs, HUNYUAN_GRID, 4,
                            sink=False, rotary="rope"),
    "hunyuan_video15": Family(tiny_hunyuan_video15, tiny_hunyuan_video15_inputs, HV15_PADDED, 2,
                              sink=False, rotary="rope"),
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_dense_steps_equal_diffusers_bitwise(family):
    """Without a tile nothing is permuted: a dense step runs diffusers' own processor."""
    case = FAMILIES[family]
    model, inputs = case.model(), case.inputs(**case.grid)
    (expected,) = run_steps(model, inputs)
    spec = AttentionSpec(density=0.3, block_size=BLOCK, tile=(1, 1, 1), sink=case.sink,
                         dense_steps=(0,))
    handle = apply_sparse_attention(model, spec, backend="torch")
    dense_step, sparse_step = run_steps(model, inputs, steps=2)
    densities = [layer.achieved_density() for layer in handle.layers]
    handle.remove()
    assert torch.equal(dense_step, expected)
    assert len(densities) == case.attention_layers and all(d < 1.0 for d in densities)
    assert not torch.allclose(sparse_step, expected, atol=1e-4)  # step 1 really ran sparse


@pytest.mark.parametrize(("family", "tile", "backend", "inputs"), [
    *[("flux", tile, backend, IMAGE_GRID) for tile in [(1, 1, 1), (1, 4, 4), (1, 4, 8),
                                                        (1, 3, 5)]
      for backend in ["torch", "dense"]],
    # HunyuanVideo always passes its key mask, so the op always gets key_valid: padded (9, 5)
    # or not (9,).
    *[("hunyuan_video", tile, backend, dict(HUNYUAN_GRID, batch=len(valid), valid=valid))
      for tile, backend, valid in [((1, 1, 1), "torch", (9, 5)), ((1, 4, 4), "torch", (9,)),
                                   ((1, 4, 4), "torch", (9, 5)), ((2, 4, 4), "dense", (9, 5)),
                                   ((1, 3, 5), "torch", (9, 5)), ((1, 3, 5), "dense", (9,))]],
    ("hunyuan_video15", (1, 1, 1), "torch", HV15_PADDED),
    ("hunyuan_video15", (1, 4, 4), "torch", HV15_PADDED),
    ("hunyuan_video15", (2, 4, 4), "dense", HV15_PADDED),
    ("hunyuan_video15", (1, 3, 5), "torch", {})])
def test_every_block_kept_equals_dense(family, tile, backend, inputs):
    """mass_threshold=1.0 keeps every block: the permutation (tokens and rotary rows), the
    canonical order [image or video tiles | text], the kernels and the key padding are
    exercised. HunyuanVideo-1.5's original also masks padding queries (rows of its dense mask):
    only padding tokens' outputs differ, and no valid token reads them."""
    case = FAMILIES[family]
    model, inputs = case.model(), case.inputs(**inputs)
    (expected,) = run_steps(model, inputs)
    handle = apply_sparse_attention(model, AttentionSpec(**KEEP_ALL, tile=tile), backend=backend)
    (actual,) = run_steps(model, inputs)
    sparse_calls = [int(layer.sparse_calls) for layer in handle.layers]
    handle.remove()
    assert sparse_calls == [1] * case.attention_layers
    # fp32, unit-scale activations: the same sums over keys in another order (tokens permuted,
    # text moved behind the image) differ by float rounding only: measured <= 4e-7 on FLUX's
    # outputs of magnitude ~1 and <= 5e-7 on HunyuanVideo's and -1.5's up to ~2.1, so 1e-5
    # leaves >= 20x margin and still catches a wrong token; a padding key let through
    # (key_valid dropped) moves outputs by >= 1e-2 (1.5e-2 measured on HunyuanVideo).
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_caller_inputs_are_not_permuted(family):
    case = FAMILIES[family]
    model, inputs = case.model(), case.inputs(**case.grid)
    saved = {k: v.clone() for k, v in inputs.items() if isinstance(v, torch.Tensor)}
    handle = apply_sparse_attention(model, AttentionSpec(density=0.3, block_size=BLOCK,
                                                         tile=(1, 4, 4)))
    run_steps(model, inputs)
    handle.remove()
    assert all(torch.equal(inputs[k], saved[k]) for k in saved)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_remove_restores_the_model_exactly(family):
    case = FAMILIES[family]
    model, inputs = case.model(), case.inputs(**case.grid)
    attention = [block.attn for _, block in get_adapter(model).blocks(model)]
    processors = [attn.processor for attn in attention]
    (expected,) = run_steps(model, inputs)
    handle = apply_sparse_attention(model, AttentionSpec(density=0.3, block_size=BLOCK,
                                                         tile=(1, 4, 4)))
    run_steps(model, inputs)
    handle.remove()
    assert [attn.processor for attn in attention] == processors
    assert not model._forward_pre_hooks and not model.proj_out._forward_hooks
    assert not model.transformer_blocks[0]._forward_pre_hooks
    if case.rotary is not None:
        assert not model.get_submodule(case.rotary)._diffusers_hook.hooks
    assert torch.equal(run_steps(model, inputs)[0], expected)


@pytest.mark.parametrize(("family", "inputs"), [
    ("flux", {}), ("hunyuan_video", dict(batch=2, valid=(9, 5)))])
def test_a_run_across_the_dual_single_boundary_caches_both_streams(family, inputs):
    """The run's text residual matters: single_transformer_blocks.1, after the run, reads the
    text stream (HunyuanVideo's concatenates both). With the same inputs at both steps, the
    reused step equals the computed one (to the rounding of input + (output - input))."""
    case = FAMILIES[family]
    model, inputs = case.model(), case.inputs(**case.grid, **inputs)
    run = ("transformer_blocks.1", "single_transformer_blocks.0")
    plan = tiny_joint_plan(model, density=1.0, runs=[
        BlockRun.from_masks(run, {"cond": (True, False)})])
    handle = apply_plan(model, plan, backend="torch")
    calls = count_attention_calls(model, run)
    computed, reused = run_steps(model, inputs, steps=2, context="cond")
    stats = handle.stats()
    handle.remove()
    assert calls == dict.fromkeys(run, 1)  # not called at the reused step
    assert stats["blocks_skipped_share"] == pytest.approx(2 / 8)
    torch.testing.assert_close(reused, computed, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("family", ["hunyuan_video", "qwenimage"])
def test_plans_refuse_flux_and_flux_refuses_theirs(family):
    model, flux = FAMILIES[family].model(), tiny_flux()
    name = type(model).__name__
    with pytest.raises(PlanError, match="plan is for a FluxTransformer2DModel, this model is a "
                                        f"{name}"):
        apply_plan(model, tiny_joint_plan(flux))
    with pytest.raises(PlanError, match=f"plan is for a {name}"):
        apply_plan(flux, tiny_joint_plan(model))
