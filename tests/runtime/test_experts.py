"""Wan2.2 experts: a plan section per expert, each running its own steps, reset at its start."""

from __future__ import annotations

import dataclasses
import json
from types import SimpleNamespace

import pytest
import torch

from ditplan.policy.experts import ExpertPlans, load_any_plan, save_any_plan
from ditplan.policy.plan import PLAN_SCHEMA_VERSION, BlockRun, ModelIdentity, PlanError
from ditplan.policy.plan_io import plan_from_dict, plan_to_dict
from ditplan.runtime.apply import apply_plan
from ditplan.runtime.experts import apply_expert_plans
from ditplan.runtime.fingerprint import model_fingerprint
from tests.factories import tiny_wan, tiny_wan_inputs, tiny_wan_plan

STEPS, BOUNDARY = 4, 0.5  # timesteps 999, 749 | 499, 249: each expert runs two steps
CONTEXTS = ("cond", "uncond")


class TwoExpertLoop:
    """WanPipeline's denoising loop (pipeline_wan.py): the high-noise expert while
    t >= boundary_ratio * 1000, then transformer_2, each call under cache_context."""

    def __init__(self, transformer, transformer_2, boundary_ratio=BOUNDARY):
        self.transformer, self.transformer_2 = transformer, transformer_2
        self.config = SimpleNamespace(boundary_ratio=boundary_ratio)
        self.calls: list[tuple[str, int]] = []

    def __call__(self, inputs: dict) -> torch.Tensor:
        latents = inputs["hidden_states"]
        for i, t in enumerate(torch.linspace(999, 249, STEPS)):
            name = "transformer" if t >= self.config.boundary_ratio * 1000 else "transformer_2"
            model = getattr(self, name)
            self.calls.append((name, i))
            preds = []
            for context in CONTEXTS:
                kwargs = {"step_index": i, "num_inference_steps": STEPS}
                with torch.no_grad(), model.cache_context(context, **kwargs):
                    preds.append(model(**{**inputs, "hidden_states": latents,
                                          "timestep": t.expand(1)}).sample)
            latents = latents - 0.1 * (preds[0] + 2.0 * (preds[0] - preds[1]))
        return latents


def _section(model, step_range, schedule):
    """A complete plan for ``model`` running ``step_range``, block 1 on ``schedule``."""
    plan = tiny_wan_plan(model, steps=STEPS, dense_steps=())
    identity = ModelIdentity(**model_fingerprint(model, with_weights=True))
    run = BlockRun(blocks=("blocks.1",), schedule=dict.fromkeys(CONTEXTS, schedule))
    workload = dataclasses.replace(plan.workload, step_range=step_range)
    layers = {**plan.layers, "blocks.1": dataclasses.replace(plan.layers["blocks.1"],
                                                             role="background")}
    return dataclasses.replace(plan, identity=identity, workload=workload, layers=layers,
                               runs=(run,))


@pytest.fixture
def pipe():
    return TwoExpertLoop(tiny_wan(seed=0), tiny_wan(seed=1))


def _plans(pipe, second="CCCF"):
    return ExpertPlans({"transformer": _section(pipe.transformer, (0, 2), "CRCC"),
                        "transformer_2": _section(pipe.transformer_2, (2, 4), second)},
                       BOUNDARY)


def test_each_expert_runs_and_computes_only_its_steps(pipe):
    handle = apply_expert_plans(pipe, _plans(pipe), backend="torch")
    pipe(tiny_wan_inputs())
    assert pipe.calls == [("transformer", 0), ("transformer", 1),
                          ("transformer_2", 2), ("transformer_2", 3)]
    first, second = (handle.handles[n].runs[0] for n in ("transformer", "transformer_2"))
    assert sorted(first.computed_steps) == [(c, 0) for c in sorted(CONTEXTS)]
    assert sorted(second.computed_steps) == [(c, 2) for c in sorted(CONTEXTS)]
    assert second.forecast_calls == 2  # step 3 forecasts from step 2 in both branches
    handle.remove()


def test_second_generation_starts_fresh_at_each_experts_first_step(pipe):
    """Runs used to drop their history at step 0 only, which transformer_2 never sees: its
    second generation forecast from the first one's residuals (a zero step gap here)."""
    inputs = tiny_wan_inputs()
    handle = apply_expert_plans(pipe, _plans(pipe), backend="torch")
    first, again = pipe(inputs), pipe(inputs)
    handle.remove()
    fresh_handle = apply_expert_plans(pipe, _plans(pipe), backend="torch")
    fresh = pipe(inputs)
    fresh_handle.remove()
    assert torch.isfinite(again).all()
    torch.testing.assert_close(again, first, rtol=0, atol=0)
    torch.testing.assert_close(fresh, first, rtol=0, atol=0)


def test_swapped_experts_refused(pipe):
    plans = _plans(pipe)
    swapped = TwoExpertLoop(pipe.transformer_2, pipe.transformer)
    with pytest.raises(PlanError, match="sections are swapped"):
        apply_expert_plans(swapped, plans)


def test_plan_kinds_must_match_the_pipeline(pipe):
    plans = _plans(pipe)
    with pytest.raises(PlanError, match="2 experts .*apply_expert_plans"):
        apply_plan(pipe, plans.experts["transformer"])
    single = SimpleNamespace(transformer=pipe.transformer, transformer_2=None,
                             config=SimpleNamespace(boundary_ratio=None))
    with pytest.raises(PlanError, match="section per expert .* this pipeline has transformer;"):
        apply_expert_plans(single, plans)
    with pytest.raises(PlanError, match="one expert's section"):
        apply_plan(single, plans.experts["transformer"])
    with pytest.raises(PlanError, match="boundary_ratio 0.5, this pipeline switches .* 0.9"):
        apply_expert_plans(TwoExpertLoop(pipe.transformer, pipe.transformer_2, 0.9), plans)


def test_call_outside_the_experts_range_refused(pipe):
    handle = apply_plan(pipe.transformer_2, _plans(pipe).experts["transformer_2"],
                        backend="torch")
    with pytest.raises(PlanError, match="boundary differs from the plan's"):
        with torch.no_grad(), pipe.transformer_2.cache_context("cond", step_index=1):
            pipe.transformer_2(**tiny_wan_inputs())
    handle.remove()


def test_expert_section_checks(pipe):
    with pytest.raises(PlanError, match="outside workload.step_range and must be C"):
        _section(pipe.transformer_2, (2, 4), "CRCF")
    with pytest.raises(PlanError, match="computing .C. at step 2"):
        _section(pipe.transformer_2, (2, 4), "CCFC")
    plans = _plans(pipe)
    no_hash = dataclasses.replace(plans.experts["transformer"], identity=dataclasses.replace(
        plans.experts["transformer"].identity, weights_hash=None))
    with pytest.raises(PlanError, match="weights_hash: required"):
        ExpertPlans({**plans.experts, "transformer": no_hash}, BOUNDARY)
    with pytest.raises(PlanError, match="must start at step 0"):
        ExpertPlans({"transformer": plans.experts["transformer_2"],
                     "transformer_2": plans.experts["transformer"]}, BOUNDARY)


def test_expert_plans_round_trip(pipe, tmp_path):
    plans = _plans(pipe)
    path = save_any_plan(plans, tmp_path / "wan22.json")
    assert json.loads(path.read_text())["experts"]["transformer_2"]["workload"][
        "step_range"] == [2, 4]
    assert load_any_plan(path) == plans
    single = save_any_plan(plans.experts["transformer"], tmp_path / "one.json")
    assert load_any_plan(single) == plans.experts["transformer"]


def test_schema_3_0_plan_loads_unchanged(pipe):
    data = plan_to_dict(tiny_wan_plan(pipe.transformer))
    assert data["schema_version"] == PLAN_SCHEMA_VERSION
    del data["workload"]["step_range"]
    for run in data["runs"]:
        del run["extrapolation"]  # 3.2's field
    data["schema_version"] = "3.0"
    plan = plan_from_dict(data)
    assert plan.workload.step_range is None and plan.workload.first_step == 0
    assert plan == dataclasses.replace(tiny_wan_plan(pipe.transformer), schema_version="3.0")


def test_calibration_keys_a_pair_on_its_whole_execution(pipe):
    from pathlib import Path

    from ditplan.policy.compiler import with_calibration
    from ditplan.policy.plan import Calibration
    from ditplan.runtime.calibrate import CalibrationSetup, candidate_key

    setup = CalibrationSetup(model="m", prompts=("p",), device="cpu", record=Path("unused"))
    plans = _plans(pipe)
    calibrated = Calibration(device="cpu", prompts=1, speedup=1.5, psnr_db=30.0, cosine=0.99,
                             dense_s=3.0, plan_s=2.0, candidates=4)
    recorded = ExpertPlans({n: with_calibration(p, calibrated) for n, p in plans.experts.items()},
                           BOUNDARY)
    assert candidate_key(recorded, setup) == candidate_key(plans, setup)  # not the provenance
    other = _plans(pipe, second="CCCR")  # transformer_2's schedule only
    assert candidate_key(other, setup) != candidate_key(plans, setup)
    assert candidate_key(plans.experts["transformer"], setup) != candidate_key(plans, setup)
