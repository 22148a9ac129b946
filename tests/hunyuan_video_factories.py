"""Tiny HunyuanVideo transformers built from config and their forward inputs, for CPU tests."""

from __future__ import annotations

import torch
from diffusers import HunyuanVideoTransformer3DModel

# ../shared/reference/models-and-cachedit.md A7, with two dual and two single blocks (runs
# then span the dual -> single boundary); 2 heads of 10, rope axes (2, 4, 4) summing to 10.
TINY_HUNYUAN_CONFIG = dict(in_channels=4, out_channels=4, num_attention_heads=2,
                           attention_head_dim=10, num_layers=2, num_single_layers=2,
                           num_refiner_layers=1, patch_size=1, patch_size_t=1,
                           guidance_embeds=True, text_embed_dim=16, pooled_projection_dim=8,
                           rope_axes_dim=(2, 4, 4))


def tiny_hunyuan_video(seed: int = 0, **overrides) -> HunyuanVideoTransformer3DModel:
    """A HunyuanVideoTransformer3DModel with random weights, in eval mode, fp32 on CPU."""
    torch.manual_seed(seed)
    return HunyuanVideoTransformer3DModel(**{**TINY_HUNYUAN_CONFIG, **overrides}).eval()


def tiny_hunyuan_video_inputs(frames: int = 2, rows: int = 8, cols: int = 12, text_len: int = 7,
                              batch: int = 1, valid: tuple[int, ...] | None = None,
                              seed: int = 1) -> dict:
    """Random tiny HunyuanVideo forward inputs: frames x rows x cols video tokens (patch 1).

    ``valid``: per batch element, its valid text tokens (a prefix, the rest padding as
    HunyuanVideoPipeline pads its prompts to 256 tokens); None: every token valid.
    """
    g = torch.Generator().manual_seed(seed)
    cfg = TINY_HUNYUAN_CONFIG
    valid = torch.tensor(valid if valid is not None else (text_len,) * batch)
    return dict(
        hidden_states=torch.randn(batch, cfg["in_channels"], frames, rows, cols, generator=g),
        timestep=torch.full((batch,), 500),
        encoder_hidden_states=torch.randn(batch, text_len, cfg["text_embed_dim"], generator=g),
        encoder_attention_mask=(torch.arange(text_len) < valid[:, None]).long(),
        pooled_projections=torch.randn(batch, cfg["pooled_projection_dim"], generator=g),
        guidance=torch.full((batch,), 6.0 * 1000),
    )
