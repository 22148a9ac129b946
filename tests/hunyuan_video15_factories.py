"""Tiny HunyuanVideo-1.5 transformers built from config and their forward inputs, for CPU tests."""

from __future__ import annotations

import torch
from diffusers import HunyuanVideo15Transformer3DModel

# ../shared/reference/models-and-cachedit.md A7: 2 blocks, 2 heads of 8, rope axes (2, 2, 4);
# 4.3M parameters (the ByT5 projection has a fixed 2048 hidden width).
TINY_HV15_CONFIG = dict(in_channels=9, out_channels=4, num_attention_heads=2, attention_head_dim=8,
                        num_layers=2, num_refiner_layers=1, mlp_ratio=2.0, patch_size=1,
                        patch_size_t=1, text_embed_dim=16, text_embed_2_dim=32,
                        image_embed_dim=12, rope_axes_dim=(2, 2, 4), target_size=16,
                        task_type="t2v")


def tiny_hunyuan_video15(seed: int = 0, **overrides) -> HunyuanVideo15Transformer3DModel:
    """A HunyuanVideo15Transformer3DModel with random weights, in eval mode, fp32 on CPU."""
    torch.manual_seed(seed)
    return HunyuanVideo15Transformer3DModel(**{**TINY_HV15_CONFIG, **overrides}).eval()


def tiny_hunyuan_video15_inputs(frames: int = 2, rows: int = 8, cols: int = 12,
                                text_len: int = 7, byt5_len: int = 4, image_len: int = 5,
                                batch: int = 1, valid: tuple[int, ...] | None = None,
                                valid_byt5: tuple[int, ...] | None = None,
                                seed: int = 1) -> dict:
    """Random tiny HunyuanVideo-1.5 T2V inputs: frames x rows x cols video tokens (patch 1)
    and text_len + byt5_len + image_len conditioning tokens (the image ones zeroed: T2V, all
    masked). ``valid`` / ``valid_byt5``: per batch element, its valid prefix of each text."""
    g = torch.Generator().manual_seed(seed)
    cfg = TINY_HV15_CONFIG

    def mask(length, counts):
        counts = torch.tensor(counts if counts is not None else (length,) * batch)
        return (torch.arange(length) < counts[:, None]).long()  # [B, L]

    return dict(
        hidden_states=torch.randn(batch, cfg["in_channels"], frames, rows, cols, generator=g),
        timestep=torch.full((batch,), 500.0),
        encoder_hidden_states=torch.randn(batch, text_len, cfg["text_embed_dim"], generator=g),
        encoder_attention_mask=mask(text_len, valid),
        encoder_hidden_states_2=torch.randn(batch, byt5_len, cfg["text_embed_2_dim"],
                                            generator=g),
        encoder_attention_mask_2=mask(byt5_len, valid_byt5),
        image_embeds=torch.zeros(batch, image_len, cfg["image_embed_dim"]),
    )
