"""Whole-call runs (target "model"): skipped calls run nothing and return Taylor forecasts."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from ditplan.policy.plan import BlockRun, PlanError
from ditplan.runtime.apply import apply_plan
from tests.factories import tiny_plan_with_run, tiny_reference_latents, tiny_reference_pipeline

STEPS = 8
SCHEDULE = "CCCFFCFC"


def _model_plan(pipe, order: int, schedule: str = SCHEDULE):
    blocks = tuple(f"blocks.{i}" for i in range(len(pipe.transformer.blocks)))  # every block
    run = BlockRun(blocks=blocks,
                   schedule=dict.fromkeys(("cond", "uncond"), schedule), target="model",
                   order=order, extrapolation="taylor")
    return tiny_plan_with_run(pipe, run, STEPS)


@pytest.fixture(scope="module")
def pipe():
    pipeline = tiny_reference_pipeline()
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def _twin(pipe, order: int) -> torch.Tensor:
    """The reference: the transformer's forward wrapped by hand, per CFG call in the pipeline's
    order (cond, uncond), extrapolating TaylorSeer's factors in float64."""
    transformer, original = pipe.transformer, pipe.transformer.forward
    calls, history = [0], {}

    def forward(*args, **kwargs):
        step, branch = divmod(calls[0], 2)
        calls[0] += 1
        factors, last = history.get(branch, ([], None))
        if SCHEDULE[step] == "C":
            out = original(*args, **kwargs)[0]
            new = [out.double()]
            for previous in factors[:order]:
                new.append((new[-1] - previous) / (step - last))
            history[branch] = (new, step)
            return (out,)
        forecast = sum(f * (step - last) ** k / math.factorial(k) for k, f in enumerate(factors))
        return (forecast.to(transformer.dtype),)

    transformer.forward = forward
    try:
        return tiny_reference_latents(pipe, STEPS)
    finally:
        del transformer.forward


@pytest.mark.parametrize("order", [1, 2])
def test_model_run_matches_a_hand_written_forecast_and_skips_the_whole_call(pipe, order):
    expected = _twin(pipe, order)
    entered = []
    hook = pipe.transformer.patch_embedding.register_forward_hook(lambda *a: entered.append(1))
    handle = apply_plan(pipe, _model_plan(pipe, order))
    try:
        ours = tiny_reference_latents(pipe, STEPS)
        stats = handle.stats()
    finally:
        handle.remove()
        hook.remove()
    # the forecasts in float32 against float64: well under the latents' scale of ~1
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-4)
    assert len(entered) == 2 * SCHEDULE.count("C")  # skipped calls never reach the embeddings
    assert stats["blocks_skipped_share"] == pytest.approx(SCHEDULE.count("F") / STEPS)


def test_model_run_removes_exactly_and_reuses(pipe):
    dense = tiny_reference_latents(pipe, STEPS)
    handle = apply_plan(pipe, _model_plan(pipe, 1, schedule="CCRRCRCR"))
    try:
        reused = tiny_reference_latents(pipe, STEPS)
    finally:
        handle.remove()
    assert not torch.equal(reused, dense)
    torch.testing.assert_close(tiny_reference_latents(pipe, STEPS), dense, rtol=0, atol=0)


def test_model_runs_refuse_a_partial_stack_other_branch_schedules_and_parallelism(pipe):
    dense = tiny_reference_latents(pipe, STEPS)
    plan = _model_plan(pipe, 1)
    (run,) = plan.runs
    with pytest.raises(PlanError, match="must list every block"):
        replace(plan, runs=(replace(run, blocks=run.blocks[1:]),))
    with pytest.raises(PlanError, match="computes all CFG contexts at the same steps"):
        replace(plan, runs=(replace(run, schedule={"cond": SCHEDULE, "uncond": "C" * STEPS}),))
    with pytest.raises(PlanError, match="--no-model-runs"):
        apply_plan(pipe, plan, parallel=object())
    # nothing was left installed: a leftover whole-call hook would forecast and differ
    torch.testing.assert_close(tiny_reference_latents(pipe, STEPS), dense, rtol=0, atol=0)
