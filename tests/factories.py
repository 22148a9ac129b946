"""Tiny diffusers models built from config, so tests never need downloaded weights."""

from __future__ import annotations

import torch
from diffusers import WanTransformer3DModel

TINY_WAN_CONFIG = dict(
    patch_size=(1, 2, 2),
    num_attention_heads=2,
    attention_head_dim=16,
    in_channels=4,
    out_channels=4,
    text_dim=32,
    freq_dim=32,
    ffn_dim=64,
    num_layers=2,
    cross_attn_norm=True,
    qk_norm="rms_norm_across_heads",
    rope_max_seq_len=64,
)


def tiny_wan(seed: int = 0, **overrides) -> WanTransformer3DModel:
    """A 2-layer WanTransformer3DModel with random weights, in eval mode, fp32 on CPU."""
    torch.manual_seed(seed)
    model = WanTransformer3DModel(**{**TINY_WAN_CONFIG, **overrides})
    return model.eval()


def tiny_wan_inputs(
    frames: int = 3,
    height: int = 8,
    width: int = 12,
    text_len: int = 5,
    batch: int = 1,
    seed: int = 1,
) -> dict:
    """Random tiny-Wan inputs; height and width are latent pixels (tokens = height/2 * width/2)."""
    g = torch.Generator().manual_seed(seed)
    cfg = TINY_WAN_CONFIG
    return dict(
        hidden_states=torch.randn(batch, cfg["in_channels"], frames, height, width, generator=g),
        timestep=torch.tensor([500] * batch),
        encoder_hidden_states=torch.randn(batch, text_len, cfg["text_dim"], generator=g),
    )
