"""Fixtures of the profiler tests: a tiny reference pipeline and a small, fast profile config."""

from __future__ import annotations

import pytest
import torch

from ditplan.profiler.config import ProfileConfig
from ditplan.runtime.reference.config import (
    SMOKE,
    build_caption_encoder,
    build_scheduler,
    build_transformer,
)
from ditplan.runtime.reference.pipeline import ReferenceVideoPipeline


def make_reference_pipe() -> ReferenceVideoPipeline:
    """The reference pipeline at the 2-layer SMOKE preset, random weights, fp32 on CPU."""
    torch.manual_seed(0)
    return ReferenceVideoPipeline(build_transformer(SMOKE).eval(),
                                  build_caption_encoder(SMOKE).eval(), build_scheduler(SMOKE))


@pytest.fixture(scope="module")
def reference_pipe() -> ReferenceVideoPipeline:
    return make_reference_pipe()


@pytest.fixture
def small_config():
    """Factory: 4 frames x 16 x 16 px = 4 x 8 x 8 tokens = 4 blocks of 64; 3 steps, CFG on."""

    def make(out, **overrides) -> ProfileConfig:
        settings = dict(out=out, prompts=("a red circle slowly moves right",), seeds=(0,),
                        steps=3, frames=4, height=16, width=16, block_size=64, tile=(1, 4, 4),
                        device="cpu", progress=False)
        return ProfileConfig(**{**settings, **overrides})

    return make
