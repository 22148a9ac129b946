"""What the joint-attention adapters (FLUX.1, Qwen-Image, HunyuanVideo, HunyuanVideo-1.5) share."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import torch
from torch import nn

from ditplan.runtime.layout import ForwardArgument
from ditplan.runtime.sparse import SparseProcessorBase


class JointSparseAttnProcessor(SparseProcessorBase):
    """The parameters of FluxAttnProcessor, HunyuanVideoAttnProcessor2_0 and
    HunyuanVideo15AttnProcessor2_0 (the same in 0.42.1); every call is joint self-attention and
    goes to the sparse runner (dense steps run the original processor)."""

    def __call__(
        self,
        attn,
        hidden_states,
        encoder_hidden_states=None,
        attention_mask=None,
        image_rotary_emb=None,
    ):
        return self.run(attn, hidden_states, encoder_hidden_states, attention_mask,
                        image_rotary_emb)


class JointAdapter:
    """The joint-attention adapters' common part: blocks in the order of their block lists, one
    transformer per pipeline. A family defines ``block_lists`` and the rest of the contract."""

    def blocks(self, transformer):
        return [named for blocks in self.block_lists(transformer)
                for named in blocks.named(transformer)]

    def experts(self, pipe) -> list[str]:
        """The pipeline's transformer (these families have one)."""
        return ["transformer"] if getattr(pipe, "transformer", None) is not None else []


def stream_qkv(attn: nn.Module, x: torch.Tensor,
               projections: Sequence[Callable[[torch.Tensor], torch.Tensor]],
               norms: Sequence[nn.Module | None]) -> list[torch.Tensor]:
    """q, k, v of one stream as the families' processors make them: each of ``projections``
    of ``x`` [B, S, C] split into ``attn.heads`` heads, [B, S, H, D]; q and k then through
    ``norms`` (a None norm leaves its tensor as it is)."""
    out = [f(x).unflatten(2, (attn.heads, -1)) for f in projections]
    for i, norm in enumerate(norms):
        if norm is not None:
            out[i] = norm(out[i])
    return out


def joint_attention_layers(blocks: list[tuple[str, nn.Module]], original: type,
                           refusal: str) -> list[tuple[str, nn.Module]]:
    """``<block>.attn`` of each of ``blocks``; raises ``ValueError`` (``refusal`` says what the
    adapter stands in for) where one runs a processor other than ``original`` or ditplan's."""
    layers = [(f"{name}.attn", block.attn) for name, block in blocks]
    for name, attn in layers:
        if not isinstance(attn.processor, original | SparseProcessorBase):
            raise ValueError(f"{name} runs {type(attn.processor).__name__}; {refusal}: "
                             "remove it first")
    return layers


def joint_model_config(transformer: nn.Module, blocks: list[str], text_len: int, *,
                       ffn_dim: int, patch_size: tuple[int, int, int]) -> dict:
    """profiler.schema.ModelConfig's fields for a model whose every block runs joint attention
    ``<block>.attn`` over its tokens and ``text_len`` text tokens; the family gives its MLP width
    and its (t, h, w) patch size."""
    config = transformer.config
    return dict(
        num_layers=len(blocks),
        num_heads=config.num_attention_heads,
        head_dim=config.attention_head_dim,
        ffn_dim=ffn_dim,
        patch_size=patch_size,
        text_len=text_len,
        cross_attention=False,
        joint_attention=True,
        blocks=tuple(blocks),
        self_attention={name: f"{name}.attn" for name in blocks},
    )


def forward_inputs(transformer: nn.Module, names: tuple[str, ...], args: tuple,
                   kwargs: dict) -> dict:
    """The values of the forward parameters ``names`` in a call of ``transformer`` with
    ``(args, kwargs)`` (None where the call leaves one at its default)."""
    return {a.name: a.get(args, kwargs) for a in _forward_arguments(type(transformer), names)}


@functools.cache
def _forward_arguments(cls: type, names: tuple[str, ...]) -> tuple[ForwardArgument, ...]:
    # resolved once per class against the signature without self
    forward = functools.partial(cls.forward, None)
    return tuple(ForwardArgument.of(forward, name) for name in names)
