"""Shared fixtures: seeded RNG, a device fixture (CPU always, CUDA when present), a saved tiny
reference pipeline, two gloo ranks."""

from __future__ import annotations

import pytest
import torch

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def pytest_addoption(parser):
    parser.addoption(
        "--update-golden", action="store_true", default=False,
        help="recompile artifacts/plans/<model>-<preset>.json from artifacts/traces/<model>/ "
        "instead of comparing against them (commit the result deliberately)",
    )


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    return request.param


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    """A tiny reference pipeline saved once per session; tests only read it."""
    from tests.factories import saved_tiny_reference_pipeline

    return saved_tiny_reference_pipeline(tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="session")
def gloo_ranks():
    """Two CPU processes in one gloo group for context-parallel tests, closed at the end."""
    from tests.gloo import GlooRanks

    ranks = GlooRanks(world=2)
    yield ranks
    ranks.close()
