"""Fixtures of the profiler tests: a tiny reference pipeline and a small, fast profile config."""

from __future__ import annotations

import pytest

from ditplan.profiler.config import ProfileConfig
from ditplan.reference.pipeline import ReferenceVideoPipeline
from tests.factories import tiny_reference_pipeline


@pytest.fixture(scope="module")
def reference_pipe() -> ReferenceVideoPipeline:
    return tiny_reference_pipeline()


@pytest.fixture
def small_config():
    """Factory: 4 frames x 16 x 16 px = 4 x 8 x 8 tokens = 4 blocks of 64; 3 steps, CFG on."""

    def make(out, **overrides) -> ProfileConfig:
        settings = dict(out=out, prompts=("a red circle slowly moves right",), seeds=(0,),
                        steps=3, frames=4, height=16, width=16, block_size=64, tile=(1, 4, 4),
                        device="cpu", progress=False)
        return ProfileConfig(**{**settings, **overrides})

    return make
