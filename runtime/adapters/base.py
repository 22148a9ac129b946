"""The adapter contract: what ditplan must know about a model family, and the adapter registry."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from torch import nn

    from ditplan.runtime.permutation import TokenPermuter
    from ditplan.runtime.sparse import LayerRuntime


@dataclass(frozen=True)
class TokenLayout:
    """Where the tokens of one self-attention sequence come from.

    ``frames``, ``height`` and ``width`` are the video token grid (after patching); ``text_len``
    text tokens sit before the video when ``text_first`` else after it (0 for cross-attention
    models such as Wan).
    """

    frames: int
    height: int
    width: int
    text_len: int = 0
    text_first: bool = False

    def __post_init__(self):
        if min(self.frames, self.height, self.width) < 1 or self.text_len < 0:
            raise ValueError(f"token layout must have a non-empty video grid, got {self}")

    @property
    def grid(self) -> tuple[int, int, int]:
        return (self.frames, self.height, self.width)

    @property
    def video_tokens(self) -> int:
        return self.frames * self.height * self.width

    @property
    def seq_len(self) -> int:
        return self.video_tokens + self.text_len


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
    from ditplan.runtime.adapters import wan  # noqa: F401  (registers the Wan family)

    for cls in type(transformer).__mro__:
        if cls in _ADAPTERS:
            return _ADAPTERS[cls]
    supported = sorted(c.__name__ for c in _ADAPTERS)
    raise ValueError(
        f"ditplan has no adapter for {type(transformer).__name__}; supported transformer "
        f"classes: {', '.join(supported)}"
    )
