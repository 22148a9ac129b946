"""Tiny Qwen-Image transformers built from config and their forward inputs, for CPU tests."""

from __future__ import annotations

import torch
from diffusers import QwenImageTransformer2DModel

# ../shared/reference/models-and-cachedit.md A7: 2 blocks, 4 heads of 16 (sum(axes) == 16).
TINY_QWEN_CONFIG = dict(patch_size=2, in_channels=16, out_channels=4, num_layers=2,
                        attention_head_dim=16, num_attention_heads=4, joint_attention_dim=16,
                        axes_dims_rope=(8, 4, 4))


def tiny_qwenimage(seed: int = 0, **overrides) -> QwenImageTransformer2DModel:
    """A QwenImageTransformer2DModel with random weights, in eval mode, fp32 on CPU."""
    torch.manual_seed(seed)
    return QwenImageTransformer2DModel(**{**TINY_QWEN_CONFIG, **overrides}).eval()


def tiny_qwenimage_inputs(rows: int = 8, cols: int = 12, text_len: int = 7, batch: int = 1,
                          valid: tuple[int, ...] | None = None, seed: int = 1) -> dict:
    """Random tiny Qwen-Image forward inputs: a rows x cols token image (packed latents).

    ``valid``: per batch element, its valid text tokens (the rest suffix padding, as
    QwenImagePipeline pads a batch of prompts); None: no mask (the pipeline drops an all-valid
    mask).
    """
    g = torch.Generator().manual_seed(seed)
    cfg = TINY_QWEN_CONFIG
    inputs = dict(
        hidden_states=torch.randn(batch, rows * cols, cfg["in_channels"], generator=g),
        encoder_hidden_states=torch.randn(batch, text_len, cfg["joint_attention_dim"],
                                          generator=g),
        timestep=torch.full((batch,), 0.5),
        img_shapes=[[(1, rows, cols)]] * batch,
    )
    if valid is not None:
        inputs["encoder_hidden_states_mask"] = torch.arange(text_len) < torch.tensor(valid)[:, None]
    return inputs
