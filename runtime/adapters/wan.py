"""Wan family adapter (Wan2.1/2.2, the reference model): names, token layout, processor."""

from __future__ import annotations

import torch
from diffusers import WanTransformer3DModel
from torch import nn

from ditplan.runtime.adapters.base import register_adapter
from ditplan.runtime.layout import TokenLayout
from ditplan.runtime.permutation import TokenPermuter
from ditplan.runtime.sparse import LayerRuntime, sparse_self_attention


def apply_wan_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Wan's interleaved rotary embedding, the same arithmetic as diffusers' WanAttnProcessor.

    Args:
        x: [B, S, H, D]; cos, sin: [1, S, 1, D].
    """
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = cos[..., 0::2], sin[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(x)


def reorder_tokens(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x[:, index]`` for hidden states [B, S, C], written into ``x`` itself in inference.

    The transformer's forward still holds the tensor it passes to the first block (and to the
    output norm), so a permuted copy would keep a second hidden-state tensor alive through that
    block (96 MiB at Wan2.1-1.3B 480p x 81; measured +0.09 GiB forward peak). In place, only a
    transient gather buffer exists. With autograd on or under torch.compile it stays a copy.
    """
    if torch.is_grad_enabled() or torch.compiler.is_compiling():
        return x[:, index]
    return x.copy_(x[:, index])


def wan_self_attention_qkv(attn: nn.Module, hidden_states: torch.Tensor, rotary_emb):
    """Project, normalize and rotate q/k/v exactly as WanAttnProcessor does for self-attention.

    Args:
        hidden_states: [B, S, C].

    Returns:
        q, k, v: [B, H, S, D].
    """
    if attn.fused_projections:
        q, k, v = attn.to_qkv(hidden_states).chunk(3, dim=-1)
    else:
        q, k, v = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
    q, k = attn.norm_q(q), attn.norm_k(k)
    q, k, v = (t.unflatten(2, (attn.heads, -1)) for t in (q, k, v))  # [B, S, H, D]
    if rotary_emb is not None:
        q, k = apply_wan_rotary(q, *rotary_emb), apply_wan_rotary(k, *rotary_emb)
    return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)


class WanSparseAttnProcessor:
    """Wan self-attention: the original processor when dense, block-mean sparse otherwise."""

    def __init__(self, original, layer: LayerRuntime):
        self.original = original
        self.layer = layer

    def __call__(
        self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None
    ):
        if encoder_hidden_states is not None or attention_mask is not None:
            return self.original(
                attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb
            )
        if not self.layer.sparse_now():
            self.layer.record_dense(hidden_states.device)
            return self.original(
                attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb
            )
        q, k, v = wan_self_attention_qkv(attn, hidden_states, rotary_emb)  # [B, H, S, D]
        out = sparse_self_attention(q, k, v, self.layer)  # [B, H, S, D]
        out = out.transpose(1, 2).flatten(2, 3).type_as(q)  # [B, S, H*D]
        return attn.to_out[1](attn.to_out[0](out))


@register_adapter(WanTransformer3DModel)
class WanAdapter:
    """WanTransformer3DModel: blocks ``blocks.{i}``, self-attention ``blocks.{i}.attn1``."""

    family = "wan"

    def attention_layers(self, transformer):
        return [(f"blocks.{i}.attn1", block.attn1) for i, block in enumerate(transformer.blocks)]

    def blocks(self, transformer):
        return [(f"blocks.{i}", block) for i, block in enumerate(transformer.blocks)]

    def token_layout(self, transformer, hidden_states_shape) -> TokenLayout:
        if len(hidden_states_shape) != 5:
            raise ValueError(
                f"Wan expects latents [B, C, F, H, W], got shape {tuple(hidden_states_shape)}"
            )
        _, _, frames, height, width = hidden_states_shape
        p_t, p_h, p_w = transformer.config.patch_size
        return TokenLayout(frames // p_t, height // p_h, width // p_w)

    def model_config(self, transformer, text_len: int) -> dict:
        """The transformer facts a cost model needs (profiler.schema.ModelConfig's fields)."""
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

    def make_processor(self, attn, layer: LayerRuntime):
        return WanSparseAttnProcessor(attn.processor, layer)

    def install_permutation(self, transformer, permuter: TokenPermuter, should_permute) -> list:
        """Permute hidden states and rotary tables once per forward; undo before the output norm."""

        def on_rope(module, args, output):
            latents = args[0]  # [B, C, F, H, W]
            layout = self.token_layout(transformer, latents.shape)
            permuter.begin(layout, latents.device, should_permute())
            if not permuter.active:
                return output
            return tuple(table[:, permuter.perm] for table in output)  # [1, S, 1, D] each

        def on_first_block(module, args):
            if not permuter.active:
                return args
            return (reorder_tokens(args[0], permuter.perm), *args[1:])  # hidden_states [B, S, C]

        def on_every_block(module, args):
            temb = args[2]
            if not permuter.active or temb.ndim != 4:  # per-token timesteps (Wan2.2 TI2V)
                return args
            return (*args[:2], permuter.permute_once(temb), *args[3:])

        def on_norm_out(module, args):
            if not permuter.active:
                return args
            return (reorder_tokens(args[0], permuter.inverse), *args[1:])

        hooks = [
            transformer.rope.register_forward_hook(on_rope),
            transformer.blocks[0].register_forward_pre_hook(on_first_block),
            transformer.norm_out.register_forward_pre_hook(on_norm_out),
        ]
        hooks += [block.register_forward_pre_hook(on_every_block) for block in transformer.blocks]
        return hooks
