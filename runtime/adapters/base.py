"""The adapter contract: what ditplan must know about a model family, and the adapter registry."""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from ditplan.runtime.layout import AttnCall, PermutePoint, StreamIO, TokenLayout

if TYPE_CHECKING:
    import torch
    from torch import nn

    from ditplan.runtime.sparse import SparseProcessorBase

# Transformer class name -> the module whose import registers its adapter. Looked up by name and
# imported on demand, so this contract imports no family (and no family imports it back in a
# circle), and a diffusers without one family's class still serves the others.
FAMILY_MODULES = {
    "WanTransformer3DModel": "ditplan.runtime.adapters.wan",
    "FluxTransformer2DModel": "ditplan.runtime.adapters.flux",
    "HunyuanVideoTransformer3DModel": "ditplan.runtime.adapters.hunyuan_video",
    "HunyuanVideo15Transformer3DModel": "ditplan.runtime.adapters.hunyuan_video15",
    "QwenImageTransformer2DModel": "ditplan.runtime.adapters.qwenimage",
}


@dataclass(frozen=True)
class BlockList:
    """One ``nn.ModuleList`` of transformer blocks: its attribute, its kind and its streams.

    ``kind`` is "video" (video tokens only, cross-attention to text), "dual" (separate video
    and text streams) or "single" (one joint stream).
    """

    attr: str
    kind: str
    io: StreamIO

    def named(self, transformer: nn.Module) -> list[tuple[str, nn.Module]]:
        """The list's blocks by fully-qualified name, in execution order."""
        return [(f"{self.attr}.{i}", b) for i, b in enumerate(getattr(transformer, self.attr))]


class ModelAdapter(Protocol):
    """Everything model-specific ditplan needs; one implementation per model family."""

    family: str
    processor_class: type[SparseProcessorBase]  # its __call__ has the original's signature

    def block_lists(self, transformer: nn.Module) -> list[BlockList]:
        """The transformer's block lists, in execution order."""

    def blocks(self, transformer: nn.Module) -> list[tuple[str, nn.Module]]:
        """All blocks by fully-qualified name, in execution order (= a plan's block_order)."""

    def attention_layers(self, transformer: nn.Module) -> list[tuple[str, nn.Module]]:
        """Self- or joint-attention modules by fully-qualified name, in execution order."""

    def token_layout(self, transformer: nn.Module, args: tuple, kwargs: dict) -> TokenLayout:
        """The self-attention token layout of a transformer forward called with these inputs."""

    def permute_points(self, transformer: nn.Module) -> list[PermutePoint]:
        """Where token-ordered tensors enter and leave the transformer."""

    def attention_call(self, attn: nn.Module, layout: TokenLayout, *native_args) -> AttnCall:
        """q, k, v per stream of a self-attention call, from the processor's own arguments.

        ``layout`` is the forward's token layout: it splits a joint sequence that reaches the
        processor as one tensor (FLUX's single-stream blocks) into its streams.
        """

    def attention_return(
        self, attn: nn.Module, call: AttnCall, out_video: torch.Tensor,
        out_text: torch.Tensor | None,
    ):
        """The processor's native return value from the attention output per stream
        ([B, S, H, D] each)."""

    def model_config(self, transformer: nn.Module, text_len: int) -> dict:
        """Facts for the cost model: profiler.schema.ModelConfig's fields.

        ``text_len`` is the length of the forward's text input (``encoder_hidden_states``
        tokens, as the profiler saw it): the keys of cross-attention (Wan), the text part of
        a joint sequence (then equal to :attr:`TokenLayout.text_len`).
        """

    def cp_plan(self, transformer: nn.Module) -> dict | None:
        """diffusers' context-parallel plan; None: context parallelism is refused."""

    def experts(self, pipe) -> list[str]:
        """The pipeline attributes holding this family's transformers."""


def block_io(adapter: ModelAdapter, transformer: nn.Module) -> dict[str, StreamIO]:
    """Each block's stream IO by block name."""
    return {name: blocks.io for blocks in adapter.block_lists(transformer)
            for name, _ in blocks.named(transformer)}


_ADAPTERS: dict[type, ModelAdapter] = {}


def register_adapter(*transformer_classes: type):
    """Class decorator: register an adapter (instantiated once) for these transformer classes."""

    def decorate(adapter_cls):
        adapter = adapter_cls()
        for cls in transformer_classes:
            _ADAPTERS[cls] = adapter
        return adapter_cls

    return decorate


def get_adapter(transformer: nn.Module) -> ModelAdapter:
    """The adapter for ``transformer``'s class; a clear error names the supported classes."""
    for cls in type(transformer).__mro__:
        if cls.__name__ in FAMILY_MODULES:
            importlib.import_module(FAMILY_MODULES[cls.__name__])
        if cls in _ADAPTERS:
            return _ADAPTERS[cls]
    supported = sorted(FAMILY_MODULES)
    raise ValueError(
        f"ditplan has no adapter for {type(transformer).__name__}; supported transformer "
        f"classes: {', '.join(supported)}"
    )
