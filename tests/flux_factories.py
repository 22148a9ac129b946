"""Tiny FLUX.1 transformers built from config and their forward inputs, for CPU tests."""

from __future__ import annotations

import torch
from diffusers import FluxTransformer2DModel

# ../shared/reference/models-and-cachedit.md A7, with two dual and two single blocks (runs
# then span the dual -> single boundary) and 2 heads of 16.
TINY_FLUX_CONFIG = dict(patch_size=1, in_channels=4, num_layers=2, num_single_layers=2,
                        attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                        pooled_projection_dim=32, axes_dims_rope=[4, 4, 8])


def tiny_flux(seed: int = 0, **overrides) -> FluxTransformer2DModel:
    """A FluxTransformer2DModel with random weights, in eval mode, fp32 on CPU."""
    torch.manual_seed(seed)
    return FluxTransformer2DModel(**{**TINY_FLUX_CONFIG, **overrides}).eval()


def image_ids(rows: int, cols: int) -> torch.Tensor:
    """FluxPipeline's img_ids [rows * cols, 3]: (0, row, col) in raster order."""
    grid = torch.stack(torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij"))
    return torch.cat([torch.zeros(1, rows, cols), grid.float()]).flatten(1).T  # [S_img, 3]


def tiny_flux_inputs(rows: int = 8, cols: int = 12, text_len: int = 7, batch: int = 1,
                     seed: int = 1) -> dict:
    """Random tiny-FLUX forward inputs: a rows x cols token image (packed latents) and text."""
    g = torch.Generator().manual_seed(seed)
    cfg = TINY_FLUX_CONFIG
    return dict(
        hidden_states=torch.randn(batch, rows * cols, cfg["in_channels"], generator=g),
        encoder_hidden_states=torch.randn(batch, text_len, cfg["joint_attention_dim"],
                                          generator=g),
        pooled_projections=torch.randn(batch, cfg["pooled_projection_dim"], generator=g),
        timestep=torch.full((batch,), 0.5),
        img_ids=image_ids(rows, cols),
        txt_ids=torch.zeros(text_len, 3),
    )

