"""Plans under diffusers' context parallelism (Ulysses over 2 gloo ranks) equal one process."""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import sys

import pytest
import torch
from diffusers import ContextParallelConfig

from ditplan.policy.plan import AttentionSpec, BlockRun, PlanError
from ditplan.runtime.apply import CHECK_RANKS, apply_plan, apply_sparse_attention
from ditplan.runtime.kernels.permute import tile_permutation
from ditplan.runtime.parallel import check_diffusers_version
from tests.factories import tiny_wan, tiny_wan_inputs, tiny_wan_plan
from tests.parallel_helpers import carries_config, cfg_steps, forward, ulysses, with_attention

HEADS = 4  # 2 per rank
GRID = dict(frames=3, height=16, width=24)  # 3 x 8 x 12 = 288 tokens, 96 a frame: the split
# at token 144 falls mid-frame 1
TOKENS, SPLIT = 288, 144
TILE = (2, 4, 4)  # tiles span frames 0 and 1: permuted tokens cross the rank boundary
SPARSE = AttentionSpec(density=0.6, head_densities=(0.2, 0.6, 0.4, 0.3), block_size=64,
                       tile=TILE, sink=False)
DENSE = AttentionSpec(density=1.0)
# the pipelined all-to-all: 8 heads (4 a rank), each with its own density
PIPELINED = dataclasses.replace(SPARSE, head_densities=(0.2, 0.6, 0.4, 0.3, 0.5, 0.25, 0.55, 0.35))
# two runs: one starting at blocks.0 (split by diffusers' hook outside it), one after it
RUNS = (BlockRun(("blocks.0", "blocks.1"), {"cond": "CRR", "uncond": "CCR"}),
        BlockRun(("blocks.2",), {"cond": "CRC", "uncond": "CCF"}))


def model(layers: int = 2):
    return tiny_wan(0, num_attention_heads=HEADS, attention_head_dim=8, num_layers=layers)


def plan_for(transformer, spec: AttentionSpec, runs: tuple = (), steps: int = 1):
    plan = tiny_wan_plan(transformer, steps=steps, densities=(1.0,) * len(transformer.blocks))
    return with_attention(plan, spec, runs)


# Functions run on each of the two ranks (importable by name for the spawned processes).

def rank_dense():
    inputs = tiny_wan_inputs(**GRID)
    single = forward(model(), inputs)
    dense_plan = model()
    apply_plan(dense_plan, plan_for(dense_plan, DENSE), parallel=ulysses())
    dense_steps = model()  # sparse layers on a dense step: the wrapped original runs Ulysses
    apply_plan(dense_steps, plan_for(dense_steps, dataclasses.replace(SPARSE, dense_steps=(0,))),
               parallel=ulysses())
    return single, forward(dense_plan, inputs), forward(dense_steps, inputs)


def rank_sparse():
    inputs = tiny_wan_inputs(**GRID)
    dense = forward(model(), inputs)
    one = model()
    handle = apply_plan(one, plan_for(one, SPARSE), backend="torch")
    single, single_stats = forward(one, inputs), handle.stats()
    two = model()
    handle = apply_plan(two, plan_for(two, SPARSE), backend="torch", parallel=ulysses())
    parallel = forward(two, inputs)
    return dict(dense=dense, single=single, parallel=parallel, single_stats=single_stats,
                parallel_stats=handle.stats(), configured=carries_config(two, len(two.blocks)))


def rank_pipelined():
    """One process, diffusers' all-to-alls, and the pipelined ones in 2 and 4 head chunks."""
    inputs = tiny_wan_inputs(**GRID)
    outs, densities = {}, {}
    for chunks in (None, 1, 2, 4):  # None: one process
        transformer = tiny_wan(0, num_attention_heads=8, attention_head_dim=8, num_layers=2)
        parallel = {} if chunks is None else dict(parallel=ulysses(), ulysses_chunks=chunks)
        handle = apply_plan(transformer, plan_for(transformer, PIPELINED), backend="torch",
                            **parallel)
        outs[chunks] = forward(transformer, inputs)
        densities[chunks] = handle.stats()["attention_density"]
    with pytest.raises(NotImplementedError) as error:  # with autograd
        transformer(**inputs, return_dict=False)
    return dict(dense=forward(tiny_wan(0, num_attention_heads=8, attention_head_dim=8,
                                       num_layers=2), inputs), outs=outs, densities=densities,
                refused=str(error.value))


def rank_per_token_timesteps():
    """Wan2.2 TI2V's [B, S] timestep: permuted at the model input, then split by diffusers."""
    inputs = {**tiny_wan_inputs(**GRID), "timestep": (torch.arange(TOKENS) * 37 % 1000)[None]}
    one = model()
    apply_plan(one, plan_for(one, SPARSE), backend="torch")
    two = model()
    apply_plan(two, plan_for(two, SPARSE), backend="torch", parallel=ulysses())
    return forward(one, inputs), forward(two, inputs)


def rank_cache(diverge: bool = False):
    inputs = tiny_wan_inputs(**GRID)
    spec = dataclasses.replace(SPARSE, dense_steps=(0,))
    one = model(layers=3)
    handle = apply_plan(one, plan_for(one, spec, steps=3), backend="torch")  # without runs
    uncached = cfg_steps(one, inputs, 3)
    handle.remove()
    handle = apply_plan(one, plan_for(one, spec, RUNS, steps=3), backend="torch")
    single, single_stats = cfg_steps(one, inputs, 3), handle.stats()
    two = model(layers=3)
    os.environ[CHECK_RANKS] = "1"
    try:
        handle = apply_plan(two, plan_for(two, spec, RUNS, steps=3), backend="torch",
                            parallel=ulysses())
        if diverge and torch.distributed.get_rank() == 1:
            handle.runs[0].actions = {c: ("C",) * 3 for c in ("cond", "uncond")}
        try:
            parallel = cfg_steps(two, inputs, 3)
        except RuntimeError as error:
            return str(error)
    finally:
        del os.environ[CHECK_RANKS]
    return dict(uncached=uncached, single=single, parallel=parallel, single_stats=single_stats,
                parallel_stats=handle.stats(),
                computed=[run.computed_steps for run in handle.runs])


def rank_cache_compiled():
    """The cache runs under Ulysses with each block's own forward compiled (dynamo's eager
    backend): diffusers' context-parallel hooks and the runs' decisions stay outside."""
    inputs = tiny_wan_inputs(**GRID)
    spec = dataclasses.replace(SPARSE, dense_steps=(0,))
    torch._dynamo.reset()
    outs = {}
    for compiled in (False, True):
        transformer = model(layers=3)
        apply_plan(transformer, plan_for(transformer, spec, RUNS, steps=3), backend="torch",
                   parallel=ulysses(), compile={"backend": "eager"} if compiled else False)
        outs[compiled] = cfg_steps(transformer, inputs, 3)
    return outs, torch._dynamo.utils.counters["stats"]["unique_graphs"]


def rank_remove():
    inputs = tiny_wan_inputs(**GRID)
    single = forward(model(), inputs)
    planned = model()
    handle = apply_plan(planned, plan_for(planned, SPARSE), backend="torch", parallel=ulysses())
    sparse = forward(planned, inputs)
    handle.remove()
    removed = forward(planned, inputs)
    plain = model()
    plain.enable_parallelism(config=ulysses())
    return dict(single=single, sparse=sparse, removed=removed, plain=forward(plain, inputs),
                processors=[type(b.attn1.processor).__name__ for b in planned.blocks])


def rank_enable_first():
    transformer = model()
    transformer.enable_parallelism(config=ulysses())
    processors = [b.attn1.processor for b in transformer.blocks]
    errors = []
    for apply in (lambda: apply_plan(transformer, plan_for(transformer, SPARSE)),
                  lambda: apply_sparse_attention(transformer, SPARSE, parallel=ulysses())):
        with pytest.raises(PlanError) as error:
            apply()
        errors.append(str(error.value))
    untouched = processors == [b.attn1.processor for b in transformer.blocks]
    return errors, untouched


def rank_odd_tokens():
    transformer = model()
    apply_plan(transformer, plan_for(transformer, SPARSE), parallel=ulysses())
    with pytest.raises(PlanError) as error:
        forward(transformer, tiny_wan_inputs(frames=3, height=6, width=10))  # 45 tokens
    return str(error.value)


def rank_without_transformers():
    """diffusers' CP hooks need Logger.warning_once, which only transformers defines."""
    shim = logging.Logger.warning_once  # the test ranks' stand-in (tests/gloo.py)
    del logging.Logger.warning_once
    sys.modules["transformers"] = None  # as if not installed: importing it fails
    try:
        transformer = model()
        with pytest.raises(PlanError) as error:
            apply_plan(transformer, plan_for(transformer, SPARSE), parallel=ulysses())
        return str(error.value), transformer._parallel_config is None
    finally:
        del sys.modules["transformers"]
        logging.Logger.warning_once = shim


def test_premise_permuted_tokens_cross_the_rank_boundary():
    perm = tile_permutation((3, 8, 12), TILE)
    assert perm.numel() == TOKENS
    assert perm[:SPLIT].max() >= SPLIT  # rank 0 holds tokens rank 1 holds unpermuted


def test_dense_under_parallelism_equals_one_process(gloo_ranks):
    for single, dense_plan, dense_steps in gloo_ranks.run(rank_dense):
        torch.testing.assert_close(dense_plan, single, rtol=0, atol=1e-6)
        # permuted dense steps: equal up to float summation order
        torch.testing.assert_close(dense_steps, single, rtol=1e-5, atol=1e-5)


def test_sparse_under_parallelism_equals_sparse_one_process(gloo_ranks):
    for rank in gloo_ranks.run(rank_sparse):
        assert rank["configured"]
        assert (rank["single"] - rank["dense"]).abs().max() > 1e-3  # really sparse
        torch.testing.assert_close(rank["parallel"], rank["single"], rtol=1e-5, atol=1e-5)
        # each rank selects for its own heads; stats() averages them over the ranks
        single = rank["single_stats"]["attention_density"]
        assert single < 0.9
        assert rank["parallel_stats"]["attention_density"] == pytest.approx(single, abs=1e-6)


def test_pipelined_all_to_all_equals_one_call_and_one_process(gloo_ranks):
    for rank in gloo_ranks.run(rank_pipelined):
        outs, densities = rank["outs"], rank["densities"]
        assert (outs[None] - rank["dense"]).abs().max() > 1e-3  # really sparse
        for chunks in (1, 2, 4):
            torch.testing.assert_close(outs[chunks], outs[None], rtol=1e-5, atol=1e-5)
            # same kept blocks: each chunk's heads select with their own densities
            assert densities[chunks] == pytest.approx(densities[None], abs=1e-6)
        assert densities[None] < 0.9
        assert "ulysses_chunks > 1 runs inference only" in rank["refused"]


@pytest.mark.parametrize("chunks, parallel, message", [
    (3, True, "4 attention heads do not split into ulysses_chunks=3 chunks on each of "
              "ulysses_degree=2 ranks (2 heads a rank); use a chunk count that divides 2"),
    (4, True, "do not split into ulysses_chunks=4"),
    (0, True, "ulysses_chunks takes an int >= 1"),
    (2.0, True, "ulysses_chunks takes an int >= 1"),
    (2, False, "ulysses_chunks=2 pipelines diffusers' Ulysses all-to-alls: it needs parallel="),
])
def test_bad_ulysses_chunks_are_refused_before_anything_is_installed(chunks, parallel, message):
    transformer = model()
    processors = [b.attn1.processor for b in transformer.blocks]
    config = ulysses() if parallel else None
    for apply in (lambda: apply_plan(transformer, plan_for(transformer, SPARSE), parallel=config,
                                     ulysses_chunks=chunks),
                  lambda: apply_sparse_attention(transformer, SPARSE, parallel=config,
                                                 ulysses_chunks=chunks)):
        with pytest.raises(PlanError, match=re.escape(message)):
            apply()
        assert processors == [b.attn1.processor for b in transformer.blocks]


def test_per_token_timesteps_under_parallelism_equal_one_process(gloo_ranks):
    for single, parallel in gloo_ranks.run(rank_per_token_timesteps):
        torch.testing.assert_close(parallel, single, rtol=1e-5, atol=1e-5)


def test_cache_runs_under_parallelism_equal_one_process(gloo_ranks):
    for rank in gloo_ranks.run(rank_cache):
        assert rank["computed"] == [[("cond", 0), ("uncond", 0), ("uncond", 1)],
                                    [("cond", 0), ("uncond", 0), ("uncond", 1), ("cond", 2)]]
        assert (rank["single"][2] - rank["uncached"][2]).abs().max() > 1e-4  # runs reuse
        for parallel, single in zip(rank["parallel"], rank["single"], strict=True):
            torch.testing.assert_close(parallel, single, rtol=1e-5, atol=1e-5)
        for key in ("blocks_skipped_share", "blocks_forecast_share"):
            assert rank["parallel_stats"][key] == rank["single_stats"][key] > 0


def test_cache_runs_under_parallelism_with_compiled_blocks_equal_eager(gloo_ranks):
    for outs, graphs in gloo_ranks.run(rank_cache_compiled):
        assert graphs >= 1
        for compiled, eager in zip(outs[True], outs[False], strict=True):
            torch.testing.assert_close(compiled, eager, rtol=0, atol=0)


def test_ranks_that_decide_differently_fail_together(gloo_ranks):
    # rank 1 computes where rank 0 reuses: both stop before the run enters a collective
    for message in gloo_ranks.run(rank_cache, True):
        assert "ranks diverged" in message and "run 0 cond step 1" in message


def test_remove_leaves_plain_context_parallelism(gloo_ranks):
    for rank in gloo_ranks.run(rank_remove):
        assert (rank["sparse"] - rank["removed"]).abs().max() > 1e-3
        assert rank["processors"] == ["WanAttnProcessor"] * 2
        torch.testing.assert_close(rank["removed"], rank["plain"], rtol=0, atol=0)
        torch.testing.assert_close(rank["plain"], rank["single"], rtol=0, atol=1e-6)


def test_parallelism_enabled_first_is_refused(gloo_ranks):
    for errors, untouched in gloo_ranks.run(rank_enable_first):
        assert untouched
        for message in errors:
            assert "pass parallel= to apply_plan" in message


def test_missing_transformers_is_refused_before_enabling(gloo_ranks):
    for message, not_parallel in gloo_ranks.run(rank_without_transformers):
        assert "pip install transformers" in message and not_parallel


def test_tokens_that_do_not_split_evenly_are_refused(gloo_ranks):
    for message in gloo_ranks.run(rank_odd_tokens):
        assert "45 video tokens do not split over ulysses_degree=2" in message


@pytest.mark.parametrize("config, message", [
    (ContextParallelConfig(ring_degree=2), "ring attention (ring_degree=2) is refused"),
    (ContextParallelConfig(ulysses_degree=2, ulysses_anything=True), "ulysses_anything"),
    (ContextParallelConfig(ulysses_degree=3), "4 attention heads do not split over "
                                              "ulysses_degree=3"),
    ("ulysses", "takes a diffusers ContextParallelConfig"),
    (ContextParallelConfig(ulysses_degree=2), "needs torch.distributed initialised"),
])
def test_unsupported_parallelism_is_refused_before_anything_is_installed(config, message):
    transformer = model()
    processors = [b.attn1.processor for b in transformer.blocks]
    for apply in (lambda: apply_plan(transformer, plan_for(transformer, SPARSE), parallel=config),
                  lambda: apply_sparse_attention(transformer, SPARSE, parallel=config)):
        with pytest.raises(PlanError, match=re.escape(message)):
            apply()
        assert processors == [b.attn1.processor for b in transformer.blocks]
        apply_plan(transformer, plan_for(transformer, SPARSE)).remove()  # nothing was left


@pytest.mark.parametrize("version, ok", [("0.42.1", True), ("0.36.0", True), ("0.43.0", False),
                                         ("0.35.2", False), ("1.0.0.dev0", False)])
def test_diffusers_versions_outside_the_checked_range_are_refused(version, ok):
    if ok:
        check_diffusers_version(version)
    else:
        with pytest.raises(PlanError, match=f"this is diffusers {version}"):
            check_diffusers_version(version)
