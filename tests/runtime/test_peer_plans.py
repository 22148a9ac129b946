"""Peers' policies as plans reproduce diffusers' own hooks on the tiny reference pipeline."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from diffusers import FirstBlockCacheConfig, TaylorSeerCacheConfig

from ditplan.policy.plan import BlockRun
from ditplan.runtime.apply import apply_plan
from tests.factories import (
    tiny_plan_with_run,
    tiny_reference_latents,
    tiny_reference_pipeline,
    tiny_wan_plan,
)

STEPS = 10


@pytest.fixture(scope="module")
def pipe():
    pipeline = tiny_reference_pipeline()
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def taylorseer_schedule(warmup: int, interval: int) -> str:
    """diffusers' TaylorSeer computes steps < warmup and those with (s - warmup - 1) % interval
    == 0 (so step ``warmup`` itself is forecast)."""
    return "".join("C" if s < warmup or (s - warmup - 1) % interval == 0 else "F"
                   for s in range(STEPS))


@pytest.mark.parametrize("order", [1, 2])
def test_taylorseer_as_a_plan_matches_diffusers(pipe, order):
    transformer = pipe.transformer
    dense = tiny_reference_latents(pipe, STEPS)
    transformer.enable_cache(TaylorSeerCacheConfig(
        cache_interval=3, disable_cache_before_step=2, max_order=order,
        taylor_factors_dtype=torch.float32, cache_identifiers=[r"blocks\.\d+"]))
    try:
        theirs = tiny_reference_latents(pipe, STEPS)
    finally:
        transformer.disable_cache()
    schedule = taylorseer_schedule(warmup=2, interval=3)
    run = BlockRun(blocks=("blocks.0", "blocks.1"), schedule=dict.fromkeys(("cond", "uncond"),
                   schedule), target="output", order=order)
    handle = apply_plan(pipe, tiny_plan_with_run(pipe, run, STEPS))
    try:
        ours = tiny_reference_latents(pipe, STEPS)
        stats = handle.stats()
    finally:
        handle.remove()
    assert schedule.count("F") == 5 and stats["blocks_forecast_share"] == pytest.approx(0.5)
    assert (theirs - dense).abs().max() > 1e-3  # the forecast really changed the output
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    assert stats["cache_memory_gib"] > 0


def test_fixed_first_block_cache_schedule_matches_diffusers(pipe):
    transformer = pipe.transformer
    calls, tail_ran = [0], []
    counter = transformer.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    tail = transformer.blocks[1].ffn.register_forward_hook(lambda *_: tail_ran.append(calls[0]))
    transformer.enable_cache(FirstBlockCacheConfig(threshold=0.2))
    try:
        theirs = tiny_reference_latents(pipe, STEPS)
    finally:
        transformer.disable_cache()
        counter.remove()
        tail.remove()
    # calls alternate cond, uncond per step: call n is step (n - 1) // 2
    masks = {c: [2 * s + 1 + i in tail_ran for s in range(STEPS)]
             for i, c in enumerate(("cond", "uncond"))}
    assert not all(masks["cond"]) and masks["cond"][0]  # FirstBlockCache skipped some steps
    run = BlockRun.from_masks(("blocks.1",), masks)
    handle = apply_plan(pipe, tiny_plan_with_run(pipe, run, STEPS))
    try:
        ours = tiny_reference_latents(pipe, STEPS)
    finally:
        handle.remove()
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_batched_cfg_follows_each_branch_schedule():
    # CFG reuse in one batched call [uncond; cond] equals the same plan on separate calls
    from tests.factories import tiny_wan, tiny_wan_inputs

    model = tiny_wan()
    steps = 6
    schedule = {"cond": "CCFCRC", "uncond": "CRRCFF"}
    run = BlockRun(("blocks.0", "blocks.1"), schedule, order=1)
    plan = replace(tiny_wan_plan(model, steps=steps, densities=(1.0, 1.0), dense_steps=()),
                   runs=(run,))
    cond, uncond = tiny_wan_inputs(seed=1), tiny_wan_inputs(seed=2)
    uncond["hidden_states"] = cond["hidden_states"]
    timesteps = [torch.tensor([900 - 150 * s]) for s in range(steps)]

    handle = apply_plan(model, plan)
    separate = []
    with torch.no_grad():
        for step, t in enumerate(timesteps):
            outs = {}
            for context, inputs in (("uncond", uncond), ("cond", cond)):
                with model.cache_context(context, step_index=step):
                    outs[context] = model(**{**inputs, "timestep": t}).sample
            separate.append(torch.cat([outs["uncond"], outs["cond"]]))
    stats_separate = handle.stats()
    handle.remove()

    handle = apply_plan(model, plan)
    batched = []
    with torch.no_grad():
        for t in timesteps:
            inputs = {k: torch.cat([uncond[k], cond[k]]) for k in cond}
            batched.append(model(**{**inputs, "timestep": t.repeat(2)}).sample)
    stats_batched = handle.stats()
    handle.remove()
    for a, b in zip(batched, separate, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert stats_batched["blocks_skipped_share"] == stats_separate["blocks_skipped_share"]
    assert stats_batched["blocks_skipped_share"] == pytest.approx(6 / 12)
