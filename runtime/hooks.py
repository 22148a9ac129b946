"""Remove one named diffusers hook from each of a set of modules."""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn


def remove_named_hook(modules: Iterable[nn.Module], name: str) -> None:
    """Remove the hook registered as ``name`` from each module's diffusers HookRegistry (its
    other hooks stay; a module without a registry or without that hook is left as it is)."""
    for module in modules:
        registry = getattr(module, "_diffusers_hook", None)
        if registry is not None:  # (remove_hook skips a name it does not hold)
            registry.remove_hook(name, recurse=False)
