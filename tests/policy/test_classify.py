"""Roles from synthetic traces: foreground-attending layers come out foreground, overrides win."""

from __future__ import annotations

import numpy as np
import pytest

from ditplan.policy.classify import classify_roles, decision_boundary
from ditplan.policy.config import CompilerConfig, CompilerError
from ditplan.policy.load_profile import load_profile
from tests.policy.policy_factories import LayerTruth, TraceSpec, write_traces

PATTERN = (True, False, False, True, False, True)


@pytest.fixture(scope="module")
def profile(tmp_path_factory):
    spec = TraceSpec(layers=tuple(LayerTruth(foreground=f) for f in PATTERN))
    return load_profile(write_traces(tmp_path_factory.mktemp("traces"), spec))


def test_foreground_layers_come_out_foreground(profile):
    decision = classify_roles(profile, CompilerConfig())
    expected = {f"blocks.{i}": "foreground" if f else "background" for i, f in enumerate(PATTERN)}
    assert decision.roles == expected
    margins = decision.classification.margins
    assert all((margins[b] > 0) == (r == "foreground") for b, r in expected.items())
    assert decision.classification.decision_boundary is not None


def test_boundary_sits_between_two_clusters():
    rng = np.random.default_rng(0)
    scores = np.concatenate([rng.normal(-2, 0.1, 6), rng.normal(2, 0.1, 6)])
    boundary = decision_boundary(scores)
    assert -1.5 < boundary < 1.5  # equal weights and spreads: near 0, far inside the gap
    assert decision_boundary(np.full(5, 0.3)) is None  # flat: nothing to split


def test_overrides(profile):
    forced = classify_roles(profile, CompilerConfig(all_roles="foreground",
                                                    roles={"blocks.0": "background"}))
    assert forced.roles["blocks.0"] == "background"
    assert {forced.roles[f"blocks.{i}"] for i in range(1, 6)} == {"foreground"}
    with pytest.raises(CompilerError, match=r"unknown blocks \['blocks.99'\]"):
        classify_roles(profile, CompilerConfig(roles={"blocks.99": "background"}))
