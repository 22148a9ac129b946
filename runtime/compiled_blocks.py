"""torch.compile under a plan: each block's own forward compiled, beneath the cache hooks."""

from __future__ import annotations

import logging
from collections.abc import Mapping

import torch
from diffusers.hooks import HookRegistry, ModelHook
from torch import nn

from ditplan.runtime.hooks import remove_named_hook

COMPILE_HOOK = "ditplan_compiled_block"
logger = logging.getLogger(__name__)

# Why beneath the hooks: compiling the whole model (torch.compile(transformer)) or each block with
# its hooks (diffusers' compile_repeated_blocks) traces the plan's per-call decisions, so dynamo
# keeps a graph per combination of the runs' actions, CFG branch and dense-or-sparse step; a plan
# with two block runs reaches the recompile limit in its first generation, and calls with a new
# combination then run eagerly (torch warns once). Compiled beneath the cache hooks, the runs
# decide in Python around the graphs, which depend on the block alone.


class CompiledForwardHook(ModelHook):
    """Calls the block's forward, as it was when this hook was registered, through
    ``torch.compile(**options)`` (compiled at the first call)."""

    def __init__(self, options: dict):
        super().__init__()
        self.options = options
        self.compiled = None

    def new_forward(self, module: nn.Module, *args, **kwargs):
        if self.compiled is None:
            self.compiled = torch.compile(self.fn_ref.original_forward, **self.options)
        return self.compiled(*args, **kwargs)


def compile_options(compile) -> dict | None:
    """``apply_plan``'s ``compile`` argument as torch.compile keyword arguments (None: off)."""
    if compile is False or compile is None:
        return None
    if compile is True:
        return {}
    if isinstance(compile, Mapping):
        backend = compile.get("backend")
        known = torch._dynamo.list_backends(exclude_tags=())
        if isinstance(backend, str) and backend not in known:
            raise ValueError(f"torch.compile has no backend {backend!r}; its backends: "
                             f"{', '.join(sorted(known))}")
        return dict(compile)
    raise TypeError(f"compile takes True, False or a dict of torch.compile keyword arguments "
                    f"(e.g. {{'mode': 'max-autotune'}}), got {compile!r}")


def check_not_compiled(blocks: Mapping[str, nn.Module], compiling: bool) -> None:
    """Blocks compiled already (``compile_repeated_blocks`` or ``block.compile()``) would trace
    the plan's cache hooks: refused with ``compile=``, warned about without it. Blocks that
    ditplan compiled (:class:`CompiledBlocks`) are refused with ``compile=`` only: their compiled
    forward is already the innermost hook."""
    ours = [name for name, block in blocks.items() if has_compile_hook(block)]
    if ours and compiling:
        raise ValueError(f"{len(ours)} blocks (e.g. {ours[0]}) are compiled by ditplan already "
                         "(compile_blocks); call its remove() first, or apply the plan without "
                         "compile=")
    compiled = [name for name, block in blocks.items()
                if getattr(block, "_compiled_call_impl", None) is not None]
    if not compiled:
        return
    advice = ("apply the plan to the uncompiled transformer with apply_plan(..., compile=True): "
              "it compiles each block beneath the plan's cache hooks")
    if compiling:
        raise ValueError(f"{len(compiled)} blocks (e.g. {compiled[0]}) are compiled already "
                         f"(compile_repeated_blocks?); {advice}")
    logger.warning("%d blocks (e.g. %s) are compiled with their hooks, so dynamo will keep a "
                   "graph per combination of the plan's cache decisions and may run eagerly past "
                   "its recompile limit; %s", len(compiled), compiled[0], advice)


def has_compile_hook(block: nn.Module) -> bool:
    """True when ditplan's compiled forward is registered on ``block``."""
    registry = getattr(block, "_diffusers_hook", None)
    return registry is not None and registry.get_hook(COMPILE_HOOK) is not None


def install_compiled_blocks(blocks: Mapping[str, nn.Module], options: dict) -> None:
    """Register the compile hook on every block; call before the cache hooks, so that it is
    the innermost one."""
    for module in blocks.values():
        registry = HookRegistry.check_if_exists_or_initialize(module)
        registry.register_hook(CompiledForwardHook(options), COMPILE_HOOK)


def remove_compiled_blocks(blocks: Mapping[str, nn.Module]) -> None:
    remove_named_hook(blocks.values(), COMPILE_HOOK)


class CompiledBlocks:
    """Blocks compiled as ``apply_plan(compile=)`` compiles them, without a plan (the dense
    twin, so that a dense run and a plan run compile alike); :meth:`remove` undoes it."""

    def __init__(self, blocks: Mapping[str, nn.Module], compile):
        options = compile_options(compile)
        if options is None:
            raise ValueError("CompiledBlocks needs compile=True or a dict of torch.compile "
                             "keyword arguments")
        check_not_compiled(blocks, compiling=True)
        self._blocks = dict(blocks)
        install_compiled_blocks(self._blocks, options)

    def remove(self) -> None:
        remove_compiled_blocks(self._blocks)
        self._blocks = {}
