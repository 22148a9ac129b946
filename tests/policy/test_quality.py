"""The predicted-error proxy: sparse attention charged its profiled output error where the traces
record it, the lost attention mass where they do not, on the steps a block computes; the search's
errors equal the proxy's, and it searches sparse attention from shorter run warm-ups and with the
dropped blocks estimated."""

from __future__ import annotations

import numpy as np
import pytest

from ditplan.policy.compiler import SEARCH_RECALLS, search_designs
from ditplan.policy.config import CompilerConfig
from ditplan.policy.cost import CostModel
from ditplan.policy.load_profile import load_profile
from ditplan.policy.plan import AttentionSpec
from ditplan.policy.quality import attention_loss, predicted_error
from ditplan.profiler.schema import DENSITY_GRID
from tests.policy.policy_factories import LayerTruth, TraceSpec, oracle_recall, write_traces

FRACTIONS = (0.1, 0.3)  # the two heads' mass fractions
# the traces store errors as float32 (rel. 6e-8); the proxy's medians and interpolation add none
SCALE = 0.25  # output error / oracle lost mass in the synthetic traces
GAIN = (0.5, 2.0)  # the estimate halves head 0's error and doubles head 1's
DENSE_STEPS = (0, 1)


def _layers(**truth):
    return (LayerTruth(head_fractions=FRACTIONS, **truth),) * 3


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    spec = TraceSpec(layers=_layers(error_scale=SCALE, estimate_gain=GAIN), output_errors=True)
    return load_profile(write_traces(tmp_path_factory.mktemp("measured"), spec))


@pytest.fixture(scope="module")
def unmeasured(tmp_path_factory):
    spec = TraceSpec(layers=_layers())
    return load_profile(write_traces(tmp_path_factory.mktemp("unmeasured"), spec))


def expected_error(head: int, density: float, estimated: bool = False) -> float:
    """The factory's error at a grid density, or between grid points on the chord."""
    grid = np.array(DENSITY_GRID)
    errors = [SCALE * (1 - oracle_recall(d, FRACTIONS[head])) for d in grid]
    xs, ys = np.concatenate([[0.0], grid, [1.0]]), np.concatenate([[1.0], errors, [0.0]])
    value = float(np.interp(density, xs, ys))
    return value * GAIN[head] if estimated and density in grid else value


def spec(density=0.2, **fields):
    return AttentionSpec(density=density, dense_steps=DENSE_STEPS, **fields)


@pytest.mark.parametrize("density", [0.1, 0.2, 0.3])
def test_a_sparse_layer_is_charged_its_profiled_output_error(measured, density):
    expected = np.mean([expected_error(h, density) for h in (0, 1)])
    assert attention_loss(measured, 0, spec(density)) == pytest.approx(expected, rel=1e-6)


def test_heads_that_estimate_are_charged_the_estimated_error(measured):
    got = attention_loss(measured, 0, spec(0.2, estimate_heads=(True, False)))
    expected = (expected_error(0, 0.2, estimated=True) + expected_error(1, 0.2)) / 2
    assert got == pytest.approx(expected, rel=1e-6)
    assert got < attention_loss(measured, 0, spec(0.2))  # head 0's estimate helps


def test_per_head_densities_and_the_ends_of_the_grid(measured):
    # a dense head costs nothing; below the grid the error rises towards 1 at density 0
    mixed = attention_loss(measured, 0, spec(1.0, head_densities=(0.2, 1.0)))
    assert mixed == pytest.approx(expected_error(0, 0.2) / 2, rel=1e-6)
    low = attention_loss(measured, 0, spec(0.02))
    assert low == pytest.approx(np.mean([expected_error(h, 0.02) for h in (0, 1)]), rel=1e-6)
    assert expected_error(0, 0.05) < low < 1.0
    assert attention_loss(measured, 0, AttentionSpec(density=1.0)) == 0.0


def test_without_output_errors_the_lost_mass_is_charged(measured, unmeasured):
    lost = attention_loss(unmeasured, 0, spec(0.2))
    # predicted recall = oracle x 0.98 (LayerTruth.prediction): lost mass 1 - 0.98 o
    expected = 1 - np.mean([0.98 * oracle_recall(0.2, f) for f in FRACTIONS])
    assert lost == pytest.approx(expected, abs=0.01)
    assert attention_loss(measured, 0, spec(0.2)) < 0.5 * lost  # the measured error: SCALE x


def test_the_searchs_errors_are_the_proxys(measured):
    meta = measured.metadata
    cost = CostModel.for_model(meta.model_config, meta.workload.num_tokens, measured.densities,
                               measured.kept_fraction)
    roles = {b: "background" for b in measured.blocks}
    designs = search_designs(measured, roles, CompilerConfig(), cost)
    # step-level sparse designs at each searched recall below 0.95 (at 0.95 every layer stays
    # dense: head 1 keeps 95% of its mass in 30% of the blocks, predicted x 0.98)
    for recall in (r for r in SEARCH_RECALLS if r is not None and r < 0.95):
        assert any(d.label.endswith(f" recall={recall}") for d in designs), recall
    for design in designs[:: max(1, len(designs) // 60)]:  # a spread of ~60 designs
        specs = {b: lp.attention for b, lp in design.layers.items()}
        assert design.error == pytest.approx(predicted_error(measured, specs, design.runs),
                                             rel=1e-12, abs=1e-15)


def test_sparse_attention_is_charged_only_on_the_steps_a_block_computes(measured):
    from ditplan.policy.plan import BlockRun
    from ditplan.policy.quality import attention_error, attention_losses

    specs = {b: spec(0.2) for b in measured.blocks}
    losses = attention_losses(measured, specs)
    steps, contexts = measured.steps, measured.contexts
    every = attention_error(measured, specs, losses, ())
    sparse_steps = steps - len(DENSE_STEPS)
    evaluations = len(measured.blocks) * steps * len(contexts)
    assert every == pytest.approx(sum(losses.values()) * sparse_steps * len(contexts)
                                  / evaluations, rel=1e-12)
    # a whole-call run that computes the dense steps and every other sparse step
    mask = tuple(s in DENSE_STEPS or (s - len(DENSE_STEPS)) % 2 == 0 for s in range(steps))
    computed = sum(mask[s] for s in range(len(DENSE_STEPS), steps))
    run = BlockRun.from_masks(measured.blocks, {c: mask for c in contexts}, target="model")
    assert attention_error(measured, specs, losses, (run,)) == pytest.approx(
        every * computed / sparse_steps, rel=1e-12)
    assert predicted_error(measured, specs, (run,)) > attention_error(measured, specs, losses,
                                                                      (run,))  # + the drift


def test_the_search_tries_sparse_attention_from_each_shorter_run_warmup_and_the_estimate(
        measured, unmeasured):
    meta = measured.metadata
    cost = CostModel.for_model(meta.model_config, meta.workload.num_tokens, measured.densities,
                               measured.kept_fraction)
    roles = {b: "background" for b in measured.blocks}
    designs = search_designs(measured, roles, CompilerConfig(), cost)
    early = [d for d in designs if "attention-warmup=" in d.label]
    assert early
    for d in early:
        start = int(d.label.split("attention-warmup=")[1].split()[0])
        assert f" warmup={start} " in d.label  # sparse from that run's own warm-up
        sparse = [lp.attention for lp in d.layers.values() if not lp.attention.is_dense]
        assert sparse and all(s.dense_steps == tuple(range(start)) for s in sparse)
    estimated = [d for d in designs if "estimate=measured" in d.label]
    # head 0's profiled error halves with the estimate (GAIN): it estimates
    assert estimated and all(any(lp.attention.estimates() for lp in d.layers.values())
                             for d in estimated)
    plain = search_designs(unmeasured, roles, CompilerConfig(), cost)  # no output errors
    assert not any("estimate=" in d.label for d in plain)
