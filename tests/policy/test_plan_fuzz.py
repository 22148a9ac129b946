"""Fuzz the plan loader: random JSON and mutated plans either load or raise PlanError."""

from __future__ import annotations

import copy
import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ditplan.policy import plan_io
from ditplan.policy.plan import Plan, PlanError
from tests.policy.policy_factories import sample_plan

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8) | st.sampled_from([10**400, -(10**30), 2**63, 1e308, 5e-324]),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                   max_size=4),
    max_leaves=20,
)
VALID = plan_io.plan_to_dict(sample_plan())
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _paths(node, prefix=()):
    yield prefix
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _paths(value, (*prefix, key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _paths(value, (*prefix, i))


PATHS = [p for p in _paths(VALID) if p]


def _load_or_plan_error(text: str) -> None:
    try:
        assert isinstance(plan_io.plan_from_json_text(text), Plan)
    except PlanError as exc:
        assert str(exc)  # a message, never an empty error


@FUZZ
@given(JSON)
def test_random_json_values(value):
    _load_or_plan_error(json.dumps(value))


@FUZZ
@given(st.text(max_size=40))
def test_random_text(text):
    _load_or_plan_error(text)


@FUZZ
@given(st.sampled_from(PATHS), JSON, st.booleans(), st.sampled_from(["1.0", "1.7", "2.0", "x"]))
def test_mutated_valid_plans(path, value, delete, version):
    data = copy.deepcopy(VALID)
    node = data
    for key in path[:-1]:
        node = node[key]
    if delete and isinstance(node, dict):
        del node[path[-1]]
    else:
        node[path[-1]] = value
    if "schema_version" in data and path != ("schema_version",):
        data["schema_version"] = version
    _load_or_plan_error(json.dumps(data))
