"""apply_plan(compile=...): each block's own forward compiled beneath the cache hooks."""

from __future__ import annotations

import contextlib
import dataclasses
import logging

import pytest
import torch
import torch._dynamo
from diffusers.models.transformers.transformer_wan import WanTransformerBlock
from torch._dynamo.eval_frame import _debug_get_cache_entry_list

from ditplan.policy.plan import BlockRun
from ditplan.runtime.apply import apply_plan, compile_blocks
from ditplan.runtime.compiled_blocks import has_compile_hook
from tests.factories import run_cfg_steps, tiny_wan, tiny_wan_inputs, tiny_wan_plan

STEPS = 8


def _two_run_plan(model):
    """Sparse attention in block 0 (dense at step 0), block 1 dense; each block its own cache
    run, with its own schedule per branch: 2 x 2 x 2 x 2 combinations a call can see."""
    plan = tiny_wan_plan(model, steps=STEPS, densities=(0.5, 1.0), dense_steps=(0,))
    runs = (BlockRun(("blocks.0",), dict.fromkeys(("cond", "uncond"), "CCRCRRCR")),
            BlockRun(("blocks.1",), {"cond": "CRCCRCRC", "uncond": "CCRRCRCC"}))
    return dataclasses.replace(plan, runs=runs)


def _entries(function) -> int:
    return len(_debug_get_cache_entry_list(function.__code__))


@contextlib.contextmanager
def _limit_warnings():
    """The messages dynamo logs when a frame hits its recompile limit (it then runs eagerly)."""
    seen: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: seen.append(record.getMessage())
    logger = logging.getLogger("torch._dynamo.convert_frame")
    logger.addHandler(handler)
    try:
        yield seen
    finally:
        logger.removeHandler(handler)


@pytest.fixture(scope="module")
def eager_outputs():
    model, inputs = tiny_wan(), tiny_wan_inputs(frames=3, height=16, width=24)
    handle = apply_plan(model, _two_run_plan(model), backend="dense")  # no host syncs on CPU
    outputs = run_cfg_steps(model, inputs, STEPS)
    handle.remove()
    return outputs


def test_compiled_blocks_match_eager_and_stay_under_the_recompile_limit(eager_outputs):
    torch._dynamo.reset()
    model, inputs = tiny_wan(), tiny_wan_inputs(frames=3, height=16, width=24)
    handle = apply_plan(model, _two_run_plan(model), backend="dense",
                        compile={"backend": "eager"})
    counters = torch._dynamo.utils.counters
    counters.clear()
    with _limit_warnings() as limits:
        generations = [run_cfg_steps(model, inputs, STEPS)]
        graphs = counters["stats"]["unique_graphs"]
        generations += [run_cfg_steps(model, inputs, STEPS) for _ in range(2)]
    entries = _entries(WanTransformerBlock.forward)
    handle.remove()
    assert graphs >= 1  # the blocks did compile
    # The runs decide outside the graphs, so the graphs depend on the block alone (processor
    # kind, dense or sparse now): the first generation compiles them all, later ones nothing.
    # (With the forced-block map built inside the graph, its break made the second generation
    # compile once more.)
    assert counters["stats"]["unique_graphs"] == graphs
    assert entries < torch._dynamo.config.recompile_limit and not limits
    for outputs in generations:
        for expected, got in zip(eager_outputs, outputs, strict=True):
            torch.testing.assert_close(got, expected, rtol=0, atol=0)  # eager backend: same ops


def test_whole_model_compile_of_the_same_plan_reaches_the_limit():
    # why apply_plan(compile=...) exists: the whole model keeps a graph per combination of the
    # runs' actions, context and dense-or-sparse, and runs eagerly past the limit
    torch._dynamo.reset()
    model, inputs = tiny_wan(), tiny_wan_inputs(frames=3, height=16, width=24)
    handle = apply_plan(model, _two_run_plan(model), backend="dense")
    with _limit_warnings() as limits:
        run_cfg_steps(torch.compile(model, backend="eager"), inputs, STEPS)
    handle.remove()
    assert any("recompile_limit" in message for message in limits), limits


def test_remove_takes_the_compiled_forward_away(eager_outputs):
    model, inputs = tiny_wan(), tiny_wan_inputs(frames=3, height=16, width=24)
    with torch.no_grad():
        before = model(**inputs).sample
    handle = apply_plan(model, _two_run_plan(model), backend="dense",
                        compile={"backend": "eager"})
    run_cfg_steps(model, inputs, 2)
    handle.remove()
    assert not any(has_compile_hook(block) for block in model.blocks)
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).sample, before, rtol=0, atol=0)


@pytest.mark.parametrize("bad, error, message", [
    ("yes", TypeError, "compile takes True, False or a dict"),
    (1, TypeError, "compile takes True, False or a dict"),
    (["max-autotune"], TypeError, "compile takes True, False or a dict"),
    ({"backend": "inductr"}, ValueError, "torch.compile has no backend 'inductr'; its backends"),
])
def test_compile_argument_is_checked_before_anything_is_installed(bad, error, message):
    model = tiny_wan()
    with pytest.raises(error, match=message):
        apply_plan(model, _two_run_plan(model), backend="dense", compile=bad)
    # nothing was left behind: the plan applies again
    apply_plan(model, _two_run_plan(model), backend="dense").remove()


def test_blocks_compiled_already_are_refused_with_compile_and_warned_about_without(caplog):
    model = tiny_wan()
    model.compile_repeated_blocks(backend="eager")  # compiles each block with its hooks
    with pytest.raises(ValueError, match=r"blocks \(e.g. blocks.0\) are compiled already .*"
                                         r"apply_plan\(\.\.\., compile=True\)"):
        apply_plan(model, _two_run_plan(model), backend="dense", compile=True)
    with caplog.at_level(logging.WARNING, logger="ditplan.runtime.compiled_blocks"):
        handle = apply_plan(model, _two_run_plan(model), backend="dense")  # refused: nothing left
    handle.remove()
    assert "may run eagerly past its recompile limit" in caplog.text


@pytest.mark.parametrize("estimate", [False, True])
def test_a_sparse_block_compiles_without_graph_breaks(estimate):
    # the layout's forced-block map counts blocks on the host; built at the first sparse call,
    # it broke every compiled block's graph at its attention (and split it into frames)
    torch._dynamo.reset()
    model, inputs = tiny_wan(), tiny_wan_inputs(frames=3, height=16, width=24)
    plan = tiny_wan_plan(model, steps=4, densities=(0.5, 0.5), dense_steps=(0,))
    if estimate:  # one head estimates its dropped blocks (block means, merge): still one graph
        layers = {name: dataclasses.replace(layer, attention=dataclasses.replace(
            layer.attention, estimate_heads=(True, False))) for name, layer in plan.layers.items()}
        plan = dataclasses.replace(plan, layers=layers)
    handle = apply_plan(model, plan, backend="dense", compile={"backend": "eager"})
    counters = torch._dynamo.utils.counters
    counters.clear()
    run_cfg_steps(model, inputs, 4)
    handle.remove()
    assert counters["stats"]["unique_graphs"] >= 1
    assert dict(counters["graph_break"]) == {}


def test_compile_blocks_without_a_plan_compiles_each_block_alike_and_removes():
    # the dense twin of apply_plan(compile=): `ditplan run --compile --compare-dense` times
    # dense through it, so both sides compile the same way
    torch._dynamo.reset()
    model, inputs = tiny_wan(), tiny_wan_inputs(frames=3, height=16, width=24)
    eager = run_cfg_steps(model, inputs, 2)
    compiled = compile_blocks(model, {"backend": "eager"})
    counters = torch._dynamo.utils.counters
    counters.clear()
    outputs = run_cfg_steps(model, inputs, 2)
    assert counters["stats"]["unique_graphs"] >= 1 and dict(counters["graph_break"]) == {}
    for expected, got in zip(eager, outputs, strict=True):
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
    compiled.remove()
    assert not any(has_compile_hook(block) for block in model.blocks)


def test_a_plan_on_blocks_compiled_by_compile_blocks_leaves_them_compiled():
    # compile_blocks then apply_plan without compile=: the compiled forward is already the
    # innermost hook, so the plan runs on it, and the plan's remove() leaves it to its owner
    torch._dynamo.reset()
    model = tiny_wan()
    compiled = compile_blocks(model, {"backend": "eager"})
    with pytest.raises(ValueError, match="compiled by ditplan already"):
        apply_plan(model, tiny_wan_plan(model, steps=2), compile=True)
    handle = apply_plan(model, tiny_wan_plan(model, steps=2))
    handle.remove()
    assert all(has_compile_hook(block) for block in model.blocks)
    compiled.remove()
    assert not any(has_compile_hook(block) for block in model.blocks)
