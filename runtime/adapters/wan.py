"""Wan family adapter (Wan2.1/2.2, the reference model): names, token layout, q/k/v, processor."""

from __future__ import annotations

import torch
from diffusers import WanTransformer3DModel
from torch import nn

from ditplan.runtime.adapters.base import BlockList, register_adapter
from ditplan.runtime.kernels.wan_qk import norm_rotate_qk
from ditplan.runtime.layout import AttnCall, PermutePoint, StreamIO, TokenLayout
from ditplan.runtime.parallel import model_cp_plan
from ditplan.runtime.sparse import SparseProcessorBase


def wan_self_attention_qkv(attn: nn.Module, hidden_states: torch.Tensor, rotary_emb):
    """Project, normalize and rotate q/k/v as WanAttnProcessor does for self-attention (on CUDA
    the norms and rotation run compiled: runtime/kernels/wan_qk.py).

    Args:
        hidden_states: [B, S, C].

    Returns:
        q, k, v: [B, H, S, D].
    """
    if attn.fused_projections:
        q, k, v = attn.to_qkv(hidden_states).chunk(3, dim=-1)
    else:
        q, k, v = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
    if rotary_emb is None:
        q, k = (t.unflatten(2, (attn.heads, -1)) for t in (attn.norm_q(q), attn.norm_k(k)))
    else:
        q, k = norm_rotate_qk(attn, q, k, rotary_emb)  # [B, S, H, D]
    v = v.unflatten(2, (attn.heads, -1))
    return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)


def diffusers_rotary(attn: nn.Module, rotary_emb):
    """The rotary tables as diffusers' WanAttnProcessor reads them, cos and sin [1, S, 1, D]:
    the compact ones the token permutation keeps ([1, S, 1, D / 2], see ``permute_points``) get
    each channel twice, which is exact at the channels that processor reads (cos at even, sin
    at odd); diffusers' own tables pass through."""
    if rotary_emb is None or rotary_emb[0].shape[-1] != attn.inner_dim // attn.heads // 2:
        return rotary_emb
    return tuple(t.repeat_interleave(2, dim=-1) for t in rotary_emb)


class WanSparseAttnProcessor(SparseProcessorBase):
    """WanAttnProcessor's parameters; self-attention calls go to the sparse runner."""

    def __call__(
        self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None
    ):
        args = (hidden_states, encoder_hidden_states, attention_mask, rotary_emb)
        if encoder_hidden_states is not None or attention_mask is not None:
            return self.original(attn, *args)
        return self.run(attn, *args)

    def original_args(self, attn, args: tuple) -> tuple:
        """Dense steps run diffusers' processor: whole rotary tables for it."""
        encoder_hidden_states, attention_mask, rotary_emb = args
        return encoder_hidden_states, attention_mask, diffusers_rotary(attn, rotary_emb)


@register_adapter(WanTransformer3DModel)
class WanAdapter:
    """WanTransformer3DModel: blocks ``blocks.{i}``, self-attention ``blocks.{i}.attn1``."""

    family = "wan"
    processor_class = WanSparseAttnProcessor

    def block_lists(self, transformer) -> list[BlockList]:
        return [BlockList("blocks", "video", StreamIO(video="hidden_states"))]

    def blocks(self, transformer):
        return [named for blocks in self.block_lists(transformer)
                for named in blocks.named(transformer)]

    def attention_layers(self, transformer):
        return [(f"blocks.{i}.attn1", block.attn1) for i, block in enumerate(transformer.blocks)]

    def token_layout(self, transformer, args, kwargs) -> TokenLayout:
        """The layout of a forward called with ``(args, kwargs)``: latents [B, C, F, H, W]."""
        shape = tuple((args[0] if args else kwargs["hidden_states"]).shape)
        if len(shape) != 5:
            raise ValueError(f"Wan expects latents [B, C, F, H, W], got shape {shape}")
        _, _, frames, height, width = shape
        p_t, p_h, p_w = transformer.config.patch_size
        return TokenLayout(frames // p_t, height // p_h, width // p_w)

    def permute_points(self, transformer) -> list[PermutePoint]:
        return [
            PermutePoint("", "model_input", "timestep", 1),  # [B, S] per token (TI2V), not [B]
            # the rotary tables, cut to the channels Wan's attention reads: [1, S, 1, D] ->
            # [1, S, 1, D / 2] (cos even, sin odd), 8 MiB less each at Wan2.1-1.3B 480p x 81
            PermutePoint("rope", "module_output", 0, 1, channels=(0, 2)),  # cos
            PermutePoint("rope", "module_output", 1, 1, channels=(1, 2)),  # sin
            PermutePoint("blocks.0", "module_input", "hidden_states", 1),  # [B, S, C]
            PermutePoint("proj_out", "unpermute_output", None, 1),  # [B, S, C_out * p]
        ]

    def attention_call(
        self, attn, layout, hidden_states, encoder_hidden_states=None, attention_mask=None,
        rotary_emb=None,
    ) -> AttnCall:
        q, k, v = wan_self_attention_qkv(attn, hidden_states, rotary_emb)  # [B, H, S, D]
        return AttnCall(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))  # [B, S, H, D]

    def attention_return(self, attn, call: AttnCall, out_video, out_text) -> torch.Tensor:
        out = out_video.flatten(2, 3).type_as(call.q_v)  # [B, S, H, D] -> [B, S, H*D]
        return attn.to_out[1](attn.to_out[0](out))

    def model_config(self, transformer, text_len: int) -> dict:
        """The transformer facts a cost model needs (profiler.schema.ModelConfig's fields).

        ``text_len`` is the cross-attention text length (the token layout has no text: Wan's
        self-attention sees video tokens only).
        """
        config = transformer.config
        blocks = [name for name, _ in self.blocks(transformer)]
        return dict(
            num_layers=config.num_layers,
            num_heads=config.num_attention_heads,
            head_dim=config.attention_head_dim,
            ffn_dim=config.ffn_dim,
            patch_size=tuple(config.patch_size),
            text_len=text_len,
            cross_attention=True,
            joint_attention=False,
            blocks=tuple(blocks),
            self_attention={name: f"{name}.attn1" for name in blocks},
        )

    def cp_plan(self, transformer) -> dict | None:
        """diffusers' own plan: split ``rope``'s tables, ``blocks.0``'s hidden states and a
        per-token timestep along the tokens, gather at ``proj_out``."""
        return model_cp_plan(transformer)

    def experts(self, pipe) -> list[str]:
        """The pipeline's transformers: Wan2.2 A14B adds ``transformer_2`` (low-noise expert)."""
        return [name for name in ("transformer", "transformer_2")
                if getattr(pipe, name, None) is not None]
