"""torch.compile (dynamo, eager backend) with a plan: no graph breaks, no per-step recompiles."""

from __future__ import annotations

import torch
import torch._dynamo

from ditplan.runtime.apply import apply_plan
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
