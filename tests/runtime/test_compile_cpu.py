"""torch.compile (dynamo, eager backend) with a plan: no graph breaks, no per-step recompiles."""

from __future__ import annotations

import dataclasses

import torch
import torch._dynamo

from ditplan.policy.plan import AttentionSpec, BlockRun
from ditplan.runtime.apply import apply_plan, apply_sparse_attention
from tests.factories import run_cfg_steps, tiny_wan, tiny_wan_inputs, tiny_wan_plan


def _eager_then_compiled_twice(model, plan, generate):
    """Outputs of ``generate(model)`` eagerly, then compiled twice, with ``plan`` applied; and
    the graph count after the first compiled generation. Returns (eager, first, second, graphs).
    """
    handle = apply_plan(model, plan, backend="dense")  # the backend without host syncs on CPU
    eager = generate(model)
    torch._dynamo.utils.counters.clear()
    compiled = torch.compile(model, backend="eager")
    first = generate(compiled)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    second = generate(compiled)
    handle.remove()
    return eager, first, second, graphs


def test_plan_traces_without_breaks_and_second_generation_reuses_every_graph():
    torch._dynamo.reset()
    model, inputs = tiny_wan(), tiny_wan_inputs(frames=3, height=16, width=24)
    plan = tiny_wan_plan(model, steps=6, cache_compute=(True, False, True, False, False, True))
    eager, first, second, graphs_after_first = _eager_then_compiled_twice(
        model, plan, lambda m: run_cfg_steps(m, inputs, 6))
    counters = torch._dynamo.utils.counters
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] == graphs_after_first  # no recompiles
    # At most one graph per CFG context x (dense or sparse) x (compute or reuse): 2 x 2 x 2.
    assert graphs_after_first <= 8
    for e, a, b in zip(eager, first, second, strict=True):
        torch.testing.assert_close(a, e, rtol=0, atol=0)  # eager backend: the same kernels
        torch.testing.assert_close(b, a, rtol=0, atol=0)


def test_forecast_plan_compiles_once_and_matches_eager():
    # Forecasting leaves the graph (as diffusers' TaylorSeer does: the offsets are host floats),
    # so graph breaks are allowed there; a second generation must still compile nothing new.
    torch._dynamo.reset()
    model, inputs = tiny_wan(), tiny_wan_inputs(frames=3, height=16, width=24)
    plan = tiny_wan_plan(model, steps=8, densities=(1.0, 1.0), dense_steps=())
    run = BlockRun(("blocks.0", "blocks.1"), dict.fromkeys(("cond", "uncond"), "CCFCFFCF"))

    def generate(m):  # the timestep moves, so the residuals change from step to step
        outs = []
        with torch.no_grad():
            for step in range(8):
                for context in ("cond", "uncond"):
                    with m.cache_context(context, step_index=step):
                        t = torch.tensor([900 - 100 * step])
                        outs.append(m(**{**inputs, "timestep": t}).sample)
        return outs

    eager, first, second, graphs = _eager_then_compiled_twice(
        model, dataclasses.replace(plan, runs=(run,)), generate)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs  # no recompiles
    for e, a, b in zip(eager, first, second, strict=True):
        torch.testing.assert_close(a, e, rtol=0, atol=0)
        torch.testing.assert_close(b, a, rtol=0, atol=0)
    with torch.no_grad(), model.cache_context("cond", step_index=2):
        computed = model(**{**inputs, "timestep": torch.tensor([700])}).sample
    forecast, previous = eager[4], eager[2]  # cond at step 2 (forecast) and step 1 (computed)
    assert 0 < (forecast - computed).abs().max() < (previous - computed).abs().max()


def test_compiling_before_any_eager_call_works_and_stops_compiling():
    # On torch 2.11 a compiled model's first call crashed when it was also the first forward with
    # sparse attention applied (dynamo re-created a TokenLayout dict key before its fields), and
    # the per-layer int call counters recompiled the model at every call afterwards. Both fail
    # this test on torch 2.11 (checked); the dense backend has no host syncs, so the model is
    # one graph as with flex on a GPU.
    spec = AttentionSpec(density=0.5, block_size=64, tile=(1, 8, 8))
    inputs = tiny_wan_inputs(frames=3, height=16, width=24)
    reference = tiny_wan()
    reference_handle = apply_sparse_attention(reference, spec, backend="dense")
    with torch.no_grad():
        expected = reference(**inputs).sample
    reference_handle.remove()
    torch._dynamo.reset()
    model = tiny_wan()
    handle = apply_sparse_attention(model, spec, backend="dense")
    compiled = torch.compile(model, backend="eager")
    counters = torch._dynamo.utils.counters
    with torch.no_grad():
        outputs = [compiled(**inputs).sample for _ in range(3)]  # compiles, first call included
        graphs = counters["stats"]["unique_graphs"]
        outputs += [compiled(**inputs).sample for _ in range(3)]
    handle.remove()
    assert counters["stats"]["unique_graphs"] == graphs  # later calls compile nothing new
    for out in outputs:
        torch.testing.assert_close(out, expected, rtol=0, atol=0)  # eager backend: same kernels
