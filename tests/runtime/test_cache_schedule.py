"""Block caching on toy blocks where computing and reusing differ: exact step masks."""

from __future__ import annotations

import pytest
import torch
from diffusers.models.cache_utils import CacheMixin
from torch import nn

from ditplan.policy.plan import BlockRun
from ditplan.runtime.cache import install_block_runs, remove_block_runs
from ditplan.runtime.context import install_step_tracker, remove_step_tracker
from ditplan.runtime.layout import StreamIO


class ToyBlock(nn.Module):
    """h -> h * w + t: the residual depends on the step's t, so a reused residual is visible."""

    def __init__(self, weight: float):
        super().__init__()
        self.weight = weight

    def forward(self, hidden, t):
        return hidden * self.weight + t


class ToyModel(nn.Module, CacheMixin):
    def __init__(self, n_blocks: int = 4):
        super().__init__()
        self.blocks = nn.ModuleList(ToyBlock(1.0 + 0.1 * i) for i in range(n_blocks))

    def forward(self, hidden, t):
        for block in self.blocks:
            hidden = block(hidden, t)
        return hidden


class KeywordToyModel(ToyModel):
    """Calls its blocks by keyword, as FLUX does."""

    def forward(self, hidden, t):
        for block in self.blocks:
            hidden = block(hidden=hidden, t=t)
        return hidden


def named_blocks(model):
    return {f"blocks.{i}": b for i, b in enumerate(model.blocks)}


def toy_io(model):
    return dict.fromkeys(named_blocks(model), StreamIO(video="hidden"))


def reference_output(model, hidden, t, steps_reused, cached_residual):
    """What the model gives when blocks 1..2 reuse ``cached_residual``."""
    b = model.blocks
    h = b[0](hidden, t)
    h = h + cached_residual if steps_reused else b[2](b[1](h, t), t)
    return b[3](h, t)


def run_steps(model, n_steps, contexts):
    hidden = torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(0))
    outputs = {c: [] for c in contexts}
    for step in range(n_steps):
        t = torch.full((1,), float(step + 1) ** 2)  # a different residual at every step
        for context in contexts:
            with model.cache_context(context, step_index=step):
                outputs[context].append(model(hidden, t))
    return hidden, outputs


@pytest.mark.parametrize("batched_cfg", [False, True])
def test_run_computes_exactly_on_its_mask_per_context(batched_cfg):
    model = ToyModel()
    compute = {
        "cond": [True, True, False, False, True, False],
        "uncond": [True, False, True, False, False, False],
    }
    contexts = ["default"] if batched_cfg else ["cond", "uncond"]
    tracker = install_step_tracker(model)
    group = BlockRun.from_masks(("blocks.1", "blocks.2"), compute)
    (run,) = install_block_runs(named_blocks(model), [group], tracker, io=toy_io(model))
    hidden, outputs = run_steps(model, 6, contexts)
    remove_block_runs(named_blocks(model))
    remove_step_tracker(model)

    for context in contexts:
        mask = compute.get(context, compute["cond"])  # one batched call follows the cond mask
        expected_steps = [(context, s) for s in range(6) if mask[s]]
        assert [c for c in run.computed_steps if c[0] == context] == expected_steps
        residual = None
        for step, out in enumerate(outputs[context]):
            t = torch.full((1,), float(step + 1) ** 2)
            if mask[step]:
                h_in = model.blocks[0](hidden, t)
                residual = model.blocks[2](model.blocks[1](h_in, t), t) - h_in
            expected = reference_output(model, hidden, t, not mask[step], residual)
            torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)
        reused = [s for s in range(6) if not mask[s]]
        computed_fresh = reference_output(model, hidden, torch.full((1,), 36.0), False, None)
        assert not torch.allclose(outputs[context][reused[-1]], computed_fresh)


def test_new_generation_recomputes_and_remove_restores():
    model = ToyModel()
    tracker = install_step_tracker(model)
    group = BlockRun.from_masks(
        ("blocks.0", "blocks.1", "blocks.2", "blocks.3"), {"cond": [True, False]}
    )
    (run,) = install_block_runs(named_blocks(model), [group], tracker, io=toy_io(model))
    run_steps(model, 2, ["cond"])
    run_steps(model, 2, ["cond"])  # step 0 again: the stale residual must not be used
    assert run.computed_steps == [("cond", 0), ("cond", 0)]
    remove_block_runs(named_blocks(model))
    remove_step_tracker(model)
    hidden, t = torch.randn(2, 3, 4), torch.ones(1)
    torch.testing.assert_close(
        model(hidden, t), reference_output(model, hidden, t, False, None), rtol=0, atol=0
    )


def test_keyword_called_blocks_follow_the_same_schedule():
    compute = {"cond": [True, False, True, False]}
    outputs, computed = {}, {}
    for model in (ToyModel(), KeywordToyModel()):
        tracker = install_step_tracker(model)
        group = BlockRun.from_masks(("blocks.1", "blocks.2"), compute)
        (run,) = install_block_runs(named_blocks(model), [group], tracker, io=toy_io(model))
        _, outputs[type(model)] = run_steps(model, 4, ["cond"])
        computed[type(model)] = run.computed_steps
        remove_block_runs(named_blocks(model))
        remove_step_tracker(model)
    assert computed[KeywordToyModel] == computed[ToyModel] == [("cond", 0), ("cond", 2)]
    for keyword, positional in zip(outputs[KeywordToyModel]["cond"], outputs[ToyModel]["cond"],
                                   strict=True):
        torch.testing.assert_close(keyword, positional, rtol=0, atol=0)


def test_runs_mixing_one_and_two_stream_blocks_are_refused():
    model = ToyModel()
    tracker = install_step_tracker(model)
    io = {**toy_io(model), "blocks.2": StreamIO("hidden", "t", ("text", "video"))}
    with pytest.raises(ValueError, match="mixes blocks of different streams"):
        install_block_runs(named_blocks(model), [BlockRun(("blocks.1", "blocks.2"), {})],
                           tracker, io=io)


def test_runs_must_be_consecutive_existing_blocks():
    model = ToyModel()
    tracker = install_step_tracker(model)
    with pytest.raises(ValueError, match="consecutive"):
        install_block_runs(
            named_blocks(model), [BlockRun(("blocks.0", "blocks.2"), {})], tracker,
            io=toy_io(model),
        )
    with pytest.raises(ValueError, match="does not have"):
        install_block_runs(named_blocks(model), [BlockRun(("blocks.7",), {})], tracker,
                           io=toy_io(model))


@pytest.mark.parametrize("variable", ["sigma", "step"])
def test_forecast_in_sigma_is_exact_for_a_residual_linear_in_sigma(variable):
    # The toy residual of blocks 1..2 is affine in t, and t is set to a multiple of sigma: with
    # unevenly spaced sigmas an order-1 forecast in sigma is exact, one in step index is not.
    sigmas = (1.0, 0.9, 0.75, 0.55, 0.3, 0.05)
    model = ToyModel()
    tracker = install_step_tracker(model)
    run = BlockRun(("blocks.1", "blocks.2"), {"cond": "CCFFCF"}, variable=variable)
    (state,) = install_block_runs(named_blocks(model), [run], tracker, io=toy_io(model),
                                  positions=sigmas)
    hidden = torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(0))
    outputs = []
    for step, sigma in enumerate(sigmas):
        with model.cache_context("cond", step_index=step):
            outputs.append(model(hidden, torch.full((1,), 10.0 * sigma)))
    remove_block_runs(named_blocks(model))
    remove_step_tracker(model)
    assert state.forecast_calls == 3
    exact = [reference_output(model, hidden, torch.full((1,), 10.0 * s), False, None)
             for s in sigmas]
    errors = [float((o - e).abs().max()) for o, e in zip(outputs, exact, strict=True)]
    assert errors[0] == errors[1] == errors[4] == 0.0  # computed steps
    if variable == "sigma":
        assert max(errors) < 1e-4
    else:
        assert min(errors[2], errors[3], errors[5]) > 1e-2
