"""FLUX.1 and Qwen-Image plans under diffusers' context parallelism (Ulysses, 2 gloo ranks)."""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch

from ditplan.policy.plan import AttentionSpec, BlockRun
from ditplan.runtime.apply import CHECK_RANKS, apply_plan
from ditplan.runtime.kernels.permute import tile_permutation
from ditplan.runtime.parallel import _by_rank, _by_segment
from tests.flux_factories import tiny_flux, tiny_flux_inputs
from tests.joint_factories import tiny_joint_plan
from tests.parallel_helpers import carries_config, cfg_steps, forward, ulysses, with_attention
from tests.qwenimage_factories import tiny_qwenimage, tiny_qwenimage_inputs

# A 12 x 24 token image (288 tokens: 144 a rank, the split falls after row 5) and 10 text
# tokens (5 a rank). 4 heads, 2 a rank.
GRID = dict(rows=12, cols=24, text_len=10)
IMAGE_TOKENS, SPLIT = 288, 144
TILE = (1, 4, 8)  # the fifth tile (rows 4-7) straddles the split: permuted tokens cross it
SPARSE = AttentionSpec(density=0.6, head_densities=(0.2, 0.6, 0.4, 0.3), block_size=64,
                       tile=TILE, sink=False)
DENSE = AttentionSpec(density=1.0)
# one run of the first block (split by diffusers at the model input, outside it), one across
# the dual -> single boundary (both streams cached per rank)
RUNS = (BlockRun(("transformer_blocks.0",), {"cond": "CRR", "uncond": "CCR"}),
        BlockRun(("transformer_blocks.1", "single_transformer_blocks.0"),
                 {"cond": "CRC", "uncond": "CCF"}))


def flux():
    return tiny_flux(0, num_attention_heads=4)


def plan_for(model, spec: AttentionSpec, runs: tuple = (), steps: int = 1):
    plan = tiny_joint_plan(model, steps=steps, cfg=bool(runs))
    return with_attention(plan, spec, runs)


# Functions run on each of the two ranks (importable by name for the spawned processes).

def rank_flux():
    inputs = tiny_flux_inputs(**GRID)
    dense = forward(flux(), inputs)
    dense_plan = flux()
    apply_plan(dense_plan, plan_for(dense_plan, DENSE), parallel=ulysses())
    one = flux()
    handle = apply_plan(one, plan_for(one, SPARSE), backend="torch")
    single, single_stats = forward(one, inputs), handle.stats()
    two = flux()
    handle = apply_plan(two, plan_for(two, SPARSE), backend="torch", parallel=ulysses())
    parallel, parallel_stats = forward(two, inputs), handle.stats()
    configured = carries_config(two, 4)  # every layer of the tiny FLUX
    handle.remove()
    plain = flux()
    plain.enable_parallelism(config=ulysses())
    return dict(dense=dense, dense_plan=forward(dense_plan, inputs), single=single,
                parallel=parallel, single_stats=single_stats, parallel_stats=parallel_stats,
                configured=configured, removed=forward(two, inputs),
                plain=forward(plain, inputs))


def rank_flux_pipelined():
    """The pipelined all-to-all (2 head chunks, one a chunk) regroups [image | text] per chunk."""
    inputs = tiny_flux_inputs(**GRID)
    one = flux()
    apply_plan(one, plan_for(one, SPARSE), backend="torch")
    two = flux()
    apply_plan(two, plan_for(two, SPARSE), backend="torch", parallel=ulysses(), ulysses_chunks=2)
    return forward(flux(), inputs), forward(one, inputs), forward(two, inputs)


def rank_flux_cache():
    inputs = tiny_flux_inputs(**GRID)
    spec = dataclasses.replace(SPARSE, dense_steps=(0,))
    one = flux()
    handle = apply_plan(one, plan_for(one, spec, RUNS, steps=3), backend="torch")
    single, single_stats = cfg_steps(one, inputs, 3), handle.stats()
    two = flux()
    os.environ[CHECK_RANKS] = "1"
    try:
        handle = apply_plan(two, plan_for(two, spec, RUNS, steps=3), backend="torch",
                            parallel=ulysses())
        parallel = cfg_steps(two, inputs, 3)
    finally:
        del os.environ[CHECK_RANKS]
    return dict(single=single, parallel=parallel, single_stats=single_stats,
                parallel_stats=handle.stats(),
                computed=[run.computed_steps for run in handle.runs])


def rank_qwenimage():
    inputs = tiny_qwenimage_inputs(rows=12, cols=24, text_len=8)
    dense = forward(tiny_qwenimage(), inputs)
    one = tiny_qwenimage()
    apply_plan(one, plan_for(one, SPARSE), backend="torch")
    two = tiny_qwenimage()
    apply_plan(two, plan_for(two, SPARSE), backend="torch", parallel=ulysses())
    masked = tiny_qwenimage_inputs(rows=12, cols=24, text_len=8, valid=(5,))
    with pytest.raises(NotImplementedError) as error:
        forward(two, masked)
    return dense, forward(one, inputs), forward(two, inputs), str(error.value)


def test_premise_permuted_tokens_cross_the_rank_boundary():
    perm = tile_permutation((1, GRID["rows"], GRID["cols"]), TILE)
    assert perm.numel() == IMAGE_TOKENS
    assert perm[:SPLIT].max() >= SPLIT  # rank 0 holds tokens rank 1 holds unpermuted


def test_regrouping_puts_each_stream_together_and_back():
    # two ranks' [image_r | text_r] as the all-to-all leaves them: image 3, text 2 a rank
    tokens = torch.tensor([0, 1, 2, 10, 11, 3, 4, 5, 12, 13])[None, :, None]  # [B, S, 1]
    grouped = _by_segment(tokens, (3, 2), 2)
    assert grouped.flatten().tolist() == [0, 1, 2, 3, 4, 5, 10, 11, 12, 13]
    assert torch.equal(_by_rank(grouped, (3, 2), 2), tokens)
    assert _by_segment(tokens, (10,), 2) is tokens  # one stream (Wan): untouched


def test_flux_under_parallelism_equals_one_process(gloo_ranks):
    for rank in gloo_ranks.run(rank_flux):
        assert rank["configured"]
        # dense: the same sums over keys in another order ([txt_0, img_0, txt_1, img_1])
        torch.testing.assert_close(rank["dense_plan"], rank["dense"], rtol=1e-5, atol=1e-5)
        assert (rank["single"] - rank["dense"]).abs().max() > 1e-3  # really sparse
        torch.testing.assert_close(rank["parallel"], rank["single"], rtol=1e-5, atol=1e-5)
        # each rank selects for its own heads; stats() averages them over the ranks
        single = rank["single_stats"]["attention_density"]
        assert single < 0.9
        assert rank["parallel_stats"]["attention_density"] == pytest.approx(single, abs=1e-6)
        # remove() leaves plain context parallelism
        torch.testing.assert_close(rank["removed"], rank["plain"], rtol=0, atol=0)
        torch.testing.assert_close(rank["plain"], rank["dense"], rtol=1e-5, atol=1e-5)


def test_flux_pipelined_all_to_all_equals_one_process(gloo_ranks):
    for dense, single, pipelined in gloo_ranks.run(rank_flux_pipelined):
        assert (single - dense).abs().max() > 1e-3  # really sparse
        torch.testing.assert_close(pipelined, single, rtol=1e-5, atol=1e-5)


def test_flux_cache_runs_under_parallelism_equal_one_process(gloo_ranks):
    for rank in gloo_ranks.run(rank_flux_cache):
        assert rank["computed"] == [[("cond", 0), ("uncond", 0), ("uncond", 1)],
                                    [("cond", 0), ("uncond", 0), ("uncond", 1), ("cond", 2)]]
        for parallel, single in zip(rank["parallel"], rank["single"], strict=True):
            torch.testing.assert_close(parallel, single, rtol=1e-5, atol=1e-5)
        for key in ("blocks_skipped_share", "blocks_forecast_share"):
            assert rank["parallel_stats"][key] == rank["single_stats"][key] > 0


def test_qwenimage_under_parallelism_equals_one_process(gloo_ranks):
    for dense, single, parallel, refused in gloo_ranks.run(rank_qwenimage):
        assert (single - dense).abs().max() > 1e-3  # really sparse
        torch.testing.assert_close(parallel, single, rtol=1e-5, atol=1e-5)
        assert "no text mask" in refused  # a sparse step with key padding is refused
