"""The adapter contract: what ditplan must know about a model family, and the adapter registry."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from torch import nn

    from ditplan.runtime.layout import TokenLayout
    from ditplan.runtime.permutation import TokenPermuter
    from ditplan.runtime.sparse import LayerRuntime

# Transformer class name -> the module whose import registers its adapter. Looked up by name and
# imported on demand, so this contract imports no family (and no family imports it back in a
# circle), and a diffusers without one family's class still serves the others.
FAMILY_MODULES = {"WanTransformer3DModel": "ditplan.runtime.adapters.wan"}


class ModelAdapter(Protocol):
    """Everything model-specific ditplan needs; one implementation per model family."""

    family: str

    def attention_layers(self, transformer: nn.Module) -> list[tuple[str, nn.Module]]:
        """Self-attention modules by fully-qualified name, in execution order."""

    def blocks(self, transformer: nn.Module) -> list[tuple[str, nn.Module]]:
        """Transformer blocks by fully-qualified name, in execution order (cache units)."""

    def token_layout(
        self, transformer: nn.Module, hidden_states_shape: tuple[int, ...]
    ) -> TokenLayout:
        """The self-attention token layout for a transformer input of this shape."""

    def model_config(self, transformer: nn.Module, text_len: int) -> dict:
        """Facts for the cost model: profiler.schema.ModelConfig's fields."""

    def make_processor(self, attn: nn.Module, layer: LayerRuntime) -> object:
        """A diffusers-compatible attention processor running ``layer``'s settings."""

    def install_permutation(self, transformer: nn.Module, permuter: TokenPermuter) -> list:
        """Hooks that permute tokens once per forward; returns removable handles."""


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
