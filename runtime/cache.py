"""Background-block caching (ProfilingDiT): a block run computes its residual or reuses it."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from diffusers.hooks import HookRegistry, ModelHook
from torch import nn

from ditplan.policy.plan import CacheGroup
from ditplan.runtime.context import StepTracker

if TYPE_CHECKING:
    from ditplan.runtime.permutation import TokenPermuter

CACHE_HOOK = "ditplan_block_cache"
FALLBACK_CONTEXT = "cond"


@dataclass
class _Residual:
    value: torch.Tensor  # [B, S, C], out(last block) - in(first block)
    permuted: bool


class RunCacheState:
    """Residuals of one run, per CFG context, plus the per-call decision shared by its blocks."""

    def __init__(self, group: CacheGroup, tracker: StepTracker, permuter: TokenPermuter | None):
        self.group = group
        self.tracker = tracker
        self.permuter = permuter
        self.residuals: dict[str, _Residual] = {}
        self.skipping = False
        self.run_input: torch.Tensor | None = None
        self.computed_steps: list[tuple[str, int]] = []  # (context, step) where the run computed

    @property
    def permuted(self) -> bool:
        return self.permuter is not None and self.permuter.active

    def begin(self) -> None:
        """Called at the run's first block: decide compute or reuse for this call."""
        state = self.tracker.state
        if state.step == 0:
            self.residuals.pop(state.context, None)  # a new generation starts
        self.skipping = state.context in self.residuals and not self._computes(state)
        if not self.skipping:
            self.computed_steps.append((state.context, state.step))

    def _computes(self, state) -> bool:
        # A call outside "cond"/"uncond" (batched CFG, no cache_context) follows the cond mask.
        mask = self.group.compute.get(state.context, self.group.compute.get(FALLBACK_CONTEXT))
        return mask is None or state.step >= len(mask) or bool(mask[state.step])

    def stored(self) -> torch.Tensor:
        entry = self.residuals[self.tracker.state.context]
        if entry.permuted == self.permuted:
            return entry.value
        index = self.permuter.perm if self.permuted else self.permuter.inverse
        return entry.value[:, index]

    def store(self, run_output: torch.Tensor) -> None:
        residual = run_output - self.run_input
        self.residuals[self.tracker.state.context] = _Residual(residual, self.permuted)
        self.run_input = None

    def clear_residuals(self) -> None:
        """A generation ended: cached residuals are stale (statistics are kept)."""
        self.residuals.clear()

    def reset(self) -> None:
        self.residuals.clear()
        self.computed_steps.clear()


class BlockCacheHook(ModelHook):
    """One block of a cached run: first/last blocks book-keep, every block skips when reusing."""

    _is_stateful = True

    def __init__(self, run: RunCacheState, position: str, hidden_arg: int, hidden_out: Callable):
        super().__init__()
        self.run = run
        self.position = position  # "first", "middle", "last" or "only"
        self.hidden_arg = hidden_arg
        self.hidden_out = hidden_out

    def new_forward(self, module: nn.Module, *args, **kwargs):
        hidden = args[self.hidden_arg]  # [B, S, C]
        if self.position in ("first", "only"):
            self.run.begin()
            if not self.run.skipping:
                self.run.run_input = hidden
        if self.run.skipping:
            return hidden + self.run.stored() if self.position in ("first", "only") else hidden
        output = self.fn_ref.original_forward(*args, **kwargs)
        if self.position in ("last", "only"):
            self.run.store(self.hidden_out(output))
        return output

    def reset_state(self, module: nn.Module) -> nn.Module:
        self.run.clear_residuals()
        return module


def _position(index: int, length: int) -> str:
    if length == 1:
        return "only"
    return "first" if index == 0 else "last" if index == length - 1 else "middle"


def install_block_cache(
    blocks: Mapping[str, nn.Module],
    groups: Sequence[CacheGroup],
    tracker: StepTracker,
    permuter: TokenPermuter | None = None,
    *,
    hidden_arg: int = 0,
    hidden_out: Callable = lambda output: output,
) -> list[RunCacheState]:
    """Install cache hooks for each group; ``blocks`` maps block name to module in execution order.

    Returns:
        The run states (their ``computed_steps`` record which (context, step) computed).
    """
    order = list(blocks)
    runs = []
    for group in groups:
        _check_consecutive(group.blocks, order)
        run = RunCacheState(group, tracker, permuter)
        for i, name in enumerate(group.blocks):
            hook = BlockCacheHook(run, _position(i, len(group.blocks)), hidden_arg, hidden_out)
            HookRegistry.check_if_exists_or_initialize(blocks[name]).register_hook(hook, CACHE_HOOK)
        runs.append(run)
    return runs


def remove_block_cache(blocks: Mapping[str, nn.Module]) -> None:
    for module in blocks.values():
        if hasattr(module, "_diffusers_hook"):
            module._diffusers_hook.remove_hook(CACHE_HOOK, recurse=False)


def _check_consecutive(run: Sequence[str], order: list[str]) -> None:
    missing = [name for name in run if name not in order]
    if missing:
        raise ValueError(f"cache run names blocks this model does not have: {missing}")
    first = order.index(run[0])
    if list(run) != order[first : first + len(run)]:
        raise ValueError(f"cache run {list(run)} is not a sequence of consecutive blocks")
