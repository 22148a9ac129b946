"""apply_plan on a tiny Wan: identity and workload checks, exact restore, sparse plus cache."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from ditplan.policy.plan import PlanError
from ditplan.policy.plan_io import load_plan, save_plan
from ditplan.runtime.apply import apply_plan
from ditplan.runtime.fingerprint import weights_hash
from tests.factories import run_steps, tiny_wan, tiny_wan_inputs, tiny_wan_plan

INPUTS = dict(frames=3, height=16, width=24)  # token grid (3, 8, 12)


def test_plan_round_trips_through_a_file_and_applies(tmp_path):
    model = tiny_wan()
    path = tmp_path / "plan.json"
    save_plan(tiny_wan_plan(model, tokens_grid=(3, 8, 12)), path)
    handle = apply_plan(model, load_plan(path), backend="torch")
    run_steps(model, tiny_wan_inputs(**INPUTS), 2)
    stats = handle.stats()
    handle.remove()
    # blocks.0 at density 0.3: dense at step 0, sparse at step 1; blocks.1 is dense (not listed).
    assert 0.3 < stats["attention_density"] < 1.0
    assert stats["blocks_skipped_share"] == 0.0


def test_remove_restores_bitwise_after_sparse_and_cachedrun_steps():
    model, inputs = tiny_wan(), tiny_wan_inputs(**INPUTS)
    expected = run_steps(model, inputs, 1)[0]
    plan = tiny_wan_plan(model, cache_compute=(True, False, True, False))
    handle = apply_plan(model, plan, backend="torch")
    outs = run_steps(model, inputs, 4, context="cond")
    handle.remove()
    # step 0: dense and computed, on permuted tokens (equal up to summation order)
    torch.testing.assert_close(outs[0], expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(outs[1], expected, atol=1e-4)  # sparse blocks.0, cached blocks.1
    assert torch.equal(run_steps(model, inputs, 1)[0], expected)
    assert (
        not hasattr(model.blocks[1], "_diffusers_hook") or not model.blocks[1]._diffusers_hook.hooks
    )


def test_cache_skips_follow_the_plan_per_context():
    model, inputs = tiny_wan(), tiny_wan_inputs(**INPUTS)
    compute = (True, False, True, False)
    plan = tiny_wan_plan(model, densities=(1.0, 1.0), cache_compute=compute)
    handle = apply_plan(model, plan, backend="torch")
    for step in range(4):
        for context in ("cond", "uncond"):
            with torch.no_grad(), model.cache_context(context, step_index=step):
                model(**inputs)
    (run,) = handle.runs
    model._diffusers_hook.reset_stateful_hooks()  # what a pipeline does when it finishes
    stats = handle.stats()
    handle.remove()
    assert run.computed_steps == [(c, s) for s in (0, 2) for c in ("cond", "uncond")]
    assert stats["blocks_skipped_share"] == pytest.approx(0.25)  # 1 of 2 blocks, half the calls


def test_plan_for_another_model_is_refused():
    model = tiny_wan()
    plan = tiny_wan_plan(model)
    with pytest.raises(PlanError, match="another WanTransformer3DModel configuration"):
        apply_plan(tiny_wan(num_layers=3), plan)
    other_weights = replace(plan, identity=replace(plan.identity, weights_hash="f" * 64))
    with pytest.raises(PlanError, match="other weights.*profile this model"):
        apply_plan(model, other_weights)
    with pytest.raises(PlanError, match="plan is for a Flux"):
        apply_plan(model, replace(plan, identity=replace(plan.identity, transformer_class="Flux")))


def test_weights_identity_holds_across_precisions_not_across_weights():
    model = tiny_wan()
    plan = tiny_wan_plan(model)
    plan = replace(plan, identity=replace(plan.identity, weights_hash=weights_hash(model)))
    apply_plan(model.to(torch.bfloat16), plan).remove()  # profiled in float32, run in bfloat16
    with torch.no_grad():
        model.blocks[0].ffn.net[0].proj.weight[0, 0] += 1.0
    with pytest.raises(PlanError, match="other weights"):
        apply_plan(model, plan)


def test_other_grid_and_too_many_steps_are_refused():
    model = tiny_wan()
    handle = apply_plan(model, tiny_wan_plan(model, tokens_grid=(3, 8, 8)), backend="torch")
    with pytest.raises(ValueError, match=r"\(3, 8, 8\) token grid"):
        run_steps(model, tiny_wan_inputs(**INPUTS), 1)
    handle.remove()
    handle = apply_plan(model, tiny_wan_plan(model, steps=2), backend="torch")
    with pytest.raises(PlanError, match="step 2 but the plan was compiled for 2 denoising steps"):
        run_steps(model, tiny_wan_inputs(**INPUTS), 3, context="cond")
    handle.reset()
    with (  # a pipeline that announces its step count is refused at its first call
        pytest.raises(PlanError, match="runs 5 steps but the plan was compiled for 2"),
        torch.no_grad(),
        model.cache_context("cond", step_index=0, num_inference_steps=5),
    ):
        model(**tiny_wan_inputs(**INPUTS))
    handle.remove()


def test_cached_residual_in_permuted_order_equals_the_unpermuted_one():
    """Computed at dense step 0 and reused at sparse step 1, with and without a tile."""
    model, inputs = tiny_wan(), tiny_wan_inputs(**INPUTS)
    outputs = {}
    for tile in [(1, 1, 1), (1, 2, 2)]:
        plan = tiny_wan_plan(model, cache_compute=(True, False, True, False))
        # mass_threshold 1.0 keeps every block: exact attention, only the token order changes.
        keep_all = replace(
            plan.layers["blocks.0"].attention, density=None, mass_threshold=1.0, tile=tile
        )
        layers = {**plan.layers, "blocks.0": replace(plan.layers["blocks.0"], attention=keep_all)}
        handle = apply_plan(model, replace(plan, layers=layers), backend="torch")
        outputs[tile] = run_steps(model, inputs, 2, context="cond")
        handle.remove()
    # fp32 attention with the same kept set in another order: summation-order differences only.
    torch.testing.assert_close(outputs[(1, 2, 2)][1], outputs[(1, 1, 1)][1], rtol=1e-5, atol=1e-5)
