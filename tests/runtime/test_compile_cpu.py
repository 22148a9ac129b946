"""torch.compile (dynamo, eager backend) with a plan: no graph breaks, no per-step recompiles."""

from __future__ import annotations

import dataclasses

import torch
import torch._dynamo

from ditplan.policy.plan import AttentionSpec, BlockRun
from ditplan.runtime.apply import apply_plan
from ditplan.runtime.sparse import apply_sparse_attention
from tests.factories import run_cfg_steps, tiny_wan, tiny_wan_inputs, tiny_wan_plan


def test_plan_traces_without_breaks_and_second_generation_reuses_every_graph():
    torch._dynamo.reset()
    model, inputs = tiny_wan(), tiny_wan_inputs(frames=3, height=16, width=24)
    plan = tiny_wan_plan(model, steps=6, cache_compute=(True, False, True, False, False, True))
    handle = apply_plan(model, plan, backend="dense")  # the backend without host syncs on CPU
    eager = run_cfg_steps(model, inputs, 6)
    counters = torch._dynamo.utils.counters
    counters.clear()
    compiled = torch.compile(model, backend="eager")
    first = run_cfg_steps(compiled, inputs, 6)
    graphs_after_first = counters["stats"]["unique_graphs"]
    second = run_cfg_steps(compiled, inputs, 6)
    handle.remove()
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
    handle = apply_plan(model, dataclasses.replace(plan, runs=(run,)), backend="dense")
    eager = run_cfg_steps(model, inputs, 8)
    counters = torch._dynamo.utils.counters
    counters.clear()
    compiled = torch.compile(model, backend="eager")
    first = run_cfg_steps(compiled, inputs, 8)
    graphs_after_first = counters["stats"]["unique_graphs"]
    second = run_cfg_steps(compiled, inputs, 8)
    handle.remove()
    assert counters["stats"]["unique_graphs"] == graphs_after_first  # no recompiles
    for e, a, b in zip(eager, first, second, strict=True):
        torch.testing.assert_close(a, e, rtol=0, atol=0)
        torch.testing.assert_close(b, a, rtol=0, atol=0)
    assert not torch.equal(eager[4], eager[2])  # step 2 forecast differs from a reuse


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
