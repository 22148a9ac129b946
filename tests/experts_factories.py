"""A tiny two-expert (Wan2.2 A14B-like) reference pipeline built from config, saved to disk."""

from __future__ import annotations

import torch

BOUNDARY = 0.6  # at 4 steps the SMOKE scheduler's timesteps are 1000, 800 | 501, 4


def tiny_experts_pipeline(boundary_ratio: float = BOUNDARY, swapped: bool = False):
    """Two 2-layer SMOKE transformers of different random weights (seeds 0 and 1), fp32 CPU;
    ``swapped`` loads them the other way round."""
    from ditplan.reference.config import (
        SMOKE,
        build_caption_encoder,
        build_scheduler,
        build_transformer,
    )
    from ditplan.reference.experts import ReferenceExpertsPipeline

    experts = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        experts.append(build_transformer(SMOKE).eval())
    if swapped:
        experts.reverse()
    torch.manual_seed(0)
    return ReferenceExpertsPipeline(experts[0], build_caption_encoder(SMOKE).eval(),
                                    build_scheduler(SMOKE), experts[1], boundary_ratio)


def saved_tiny_experts_pipeline(folder, **options):
    """:func:`tiny_experts_pipeline` saved as a diffusers folder (what ``--model`` takes)."""
    path = folder / ("tiny-experts-swapped" if options.get("swapped") else "tiny-experts")
    tiny_experts_pipeline(**options).save_pretrained(path)
    return path
