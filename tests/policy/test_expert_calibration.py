"""Calibrating a two-expert profile: shortlists paired by rank, pairs measured (a fake measuring
callable: no torch here), the pick following what the pairs measured."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest

from ditplan.policy.compiler import BOUNDARY_REPEATS, calibration_shortlist
from ditplan.policy.config import CompilerConfig, CompilerError
from ditplan.policy.expert_compiler import compile_experts, pair_by_rank
from ditplan.policy.experts import ExpertPlans
from ditplan.policy.plan import EXPERTS, Calibration
from ditplan.profiler.experts import ExpertIndex, write_index
from ditplan.profiler.schema import ModelFingerprint
from tests.policy.policy_factories import LayerTruth, TraceSpec, write_traces

LAYERS = (LayerTruth(True, 0.1), LayerTruth(False, 0.2), LayerTruth(False, 0.1),
          LayerTruth(True, 0.1))
STEPS = 8  # per expert: transformer runs steps 0-7, transformer_2 steps 8-15


@pytest.fixture(scope="module")
def traces(tmp_path_factory):
    """A two-expert profile: each expert's folder an ordinary trace folder of its own steps."""
    root = tmp_path_factory.mktemp("expert-traces")
    for seed, (name, decay) in enumerate(zip(EXPERTS, (1.5, 0.8), strict=True)):
        fingerprint = ModelFingerprint("WanTransformer3DModel", "cfg-abc123", f"w-{name}")
        write_traces(root / name, TraceSpec(layers=LAYERS, steps=STEPS, uncond_decay=decay,
                                            fingerprint=fingerprint), seed=seed)
    write_index(root, ExpertIndex(0.875, 2 * STEPS, {"transformer": (0, STEPS),
                                                     "transformer_2": (STEPS, 2 * STEPS)}))
    return root


def _measured(speedup: float, psnr: float) -> Calibration:
    return Calibration(device="cpu", prompts=1, speedup=speedup, psnr_db=psnr, cosine=0.99,
                       dense_s=2.0, plan_s=2.0 / speedup, candidates=1)


class Fake:
    """Measures each pair as ``rule(position in the first call)``; records what it was given."""

    def __init__(self, rule):
        self.rule, self.seen, self.retimed = rule, [], []

    def __call__(self, plans, repeats=None):
        assert all(isinstance(p, ExpertPlans) for p in plans)
        if repeats is not None:
            assert repeats == BOUNDARY_REPEATS
            self.retimed.extend(plans)
            return [self.rule(self.seen.index(p), again=True) for p in plans]
        self.seen.extend(plans)
        return [self.rule(i) for i in range(len(plans))]


def _without_calibration(plans: ExpertPlans) -> dict:
    return {name: dataclasses.replace(p, provenance=dataclasses.replace(p.provenance,
                                                                        calibration=None))
            for name, p in plans.experts.items()}


def test_the_pair_that_measures_best_is_kept_and_recorded_in_each_section(traces):
    config = CompilerConfig.from_name("balanced", target_speedup=1.5, calibrate_candidates=4)
    shortlists = {n: calibration_shortlist(traces / n, config) for n in EXPERTS}
    fake = Fake(lambda i, again=False: _measured(1.6, 30.0 + i))  # the last pair measures best
    plans = compile_experts(traces, config, calibrate=fake)
    pairs = fake.seen
    assert len(pairs) == max(len(s.chosen) for s in shortlists.values()) > 1
    for i, pair in enumerate(pairs):  # the i-th candidates of each expert, at its own steps
        for name, shortlist in shortlists.items():
            chosen = shortlist.chosen
            rank = i if i < len(chosen) else min(range(len(chosen)), key=lambda j: chosen[j].error)
            section = pair.experts[name]
            assert section.provenance.compiler_settings["design"] == chosen[rank].label
            assert section.workload.steps == 2 * STEPS
    assert _without_calibration(plans) == _without_calibration(pairs[-1])  # not the predicted-best
    assert not fake.retimed  # 1.6x is clear of the target band
    recorded = {p.provenance.calibration for p in plans.experts.values()}
    assert recorded == {dataclasses.replace(_measured(1.6, 30.0 + len(pairs) - 1),
                                            candidates=len(pairs))}


def test_min_psnr_keeps_the_fastest_pair_meeting_it(traces):
    config = CompilerConfig.from_name("balanced", min_psnr=35.0, calibrate_candidates=3)
    fake = Fake(lambda i, again=False: _measured(1.2 + 0.3 * i, 40.0 - 3.0 * i))
    plans = compile_experts(traces, config, calibrate=fake)
    assert len(fake.seen) >= 2
    calibration = plans.experts["transformer_2"].provenance.calibration
    assert calibration.speedup == pytest.approx(1.5) and calibration.psnr_db == 37.0


def test_an_unreachable_target_says_what_the_pairs_reached(traces):
    config = CompilerConfig.from_name("balanced", target_speedup=1.5, calibrate_candidates=3)
    fake = Fake(lambda i, again=False: _measured(1.1 + 0.1 * i, 30.0 - i))
    with pytest.raises(CompilerError, match=r"no calibrated candidate reaches 1.50x: of \d "
                                            r"measured, the fastest ran 1.[23]0x"):
        compile_experts(traces, config, calibrate=fake)
    with pytest.raises(CompilerError, match=r"transformer: target speedup 40.00x is not "
                                            r"reachable"):  # by prediction, naming the expert
        compile_experts(traces, dataclasses.replace(config, target_speedup=40.0), calibrate=fake)


def test_pairs_timed_near_the_target_are_timed_again(traces):
    config = CompilerConfig.from_name("balanced", target_speedup=1.5, calibrate_candidates=3)
    # every pair reads 1.51x once and 1.49x over three batches: none reaches the target
    fake = Fake(lambda i, again=False: _measured(1.49 if again else 1.51, 35.0))
    with pytest.raises(CompilerError, match="no calibrated candidate reaches 1.50x"):
        compile_experts(traces, config, calibrate=fake)
    assert fake.retimed == fake.seen


def test_refine_is_refused_for_experts(traces):
    config = CompilerConfig.from_name("balanced", target_speedup=1.5, refine_rounds=1)
    with pytest.raises(CompilerError, match="--refine is not supported for a two-expert"):
        compile_experts(traces, config, calibrate=Fake(None))


def test_shortlists_pair_by_rank_padding_the_shorter_with_its_least_error():
    first = [SimpleNamespace(error=e) for e in (0.3, 0.1, 0.2)]
    second = [SimpleNamespace(error=e) for e in (0.5, 0.4, 0.6, 0.9, 0.7)]
    assert pair_by_rank(first, second) == [(0, 0), (1, 1), (2, 2), (1, 3), (1, 4)]
    assert pair_by_rank(second[:1], first) == [(0, 0), (0, 1), (0, 2)]
