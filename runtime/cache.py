"""Block runs: per CFG branch and step a run of blocks computes, reuses or forecasts its value."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING

import torch
from diffusers.hooks import HookRegistry, ModelHook
from torch import nn

from ditplan.policy.plan import COMPUTE, FORECAST, BlockRun
from ditplan.runtime.context import StepTracker

if TYPE_CHECKING:
    from ditplan.runtime.permutation import TokenPermuter

CACHE_HOOK = "ditplan_block_cache"
FALLBACK_CONTEXT = "cond"


class TaylorHistory:
    """TaylorSeer's finite-difference factors of one run's value in one CFG context.

    ``factors[k]`` [B, S, C] approximates the k-th derivative of the value in the run's
    variable (step index or sigma) at ``position``, the last computed step's; factor k + 1 is
    (new factor k - previous factor k) / (position gap), as diffusers' TaylorSeer updates it.
    """

    def __init__(self, order: int, dtype: torch.dtype | None, permuted: bool):
        self.order = order
        self.dtype = dtype  # None: the value's own dtype
        self.permuted = permuted
        self.factors: list[torch.Tensor] = []
        self.position: float | None = None

    def update(self, value: torch.Tensor, position: float) -> None:
        """Refresh the factors with the value [B, S, C] computed at ``position``."""
        if self.order == 0:  # reuse only: a plain store, traced without a graph break
            self.factors = [value]
            return
        self._update_taylor(value, position)

    @torch.compiler.disable
    def _update_taylor(self, value: torch.Tensor, position: float) -> None:
        # Out of the compiled graph (as diffusers' TaylorSeer): the position gaps are host floats
        value = value.to(self.dtype)
        new = [value]
        if self.position is not None:
            gap = position - self.position
            for previous in self.factors[: self.order]:
                new.append((new[-1] - previous.to(value.dtype)) / gap)
        self.factors = [f.to(self.dtype) if self.dtype else f for f in new]
        self.position = position

    @torch.compiler.disable  # the offset is a host float: no per-offset recompiles
    def predict(self, position: float, dtype: torch.dtype) -> torch.Tensor:
        """The Taylor polynomial at ``position`` [B, S, C] (order 0 alone: the last value)."""
        offset = position - self.position
        out = self.factors[0].to(dtype)
        for k, factor in enumerate(self.factors[1:], start=1):
            out = out + factor.to(dtype) * (offset**k / math.factorial(k))
        return out

    def reorder(self, index: torch.Tensor, permuted: bool) -> None:
        """Move the factors to another token order (``index`` gathers along the sequence)."""
        self.factors = [f[:, index] for f in self.factors]
        self.permuted = permuted

    @property
    def nbytes(self) -> int:
        return sum(f.numel() * f.element_size() for f in self.factors)


class RunState:
    """Histories of one run per CFG context, and the decision its blocks share for this call."""

    def __init__(self, run: BlockRun, tracker: StepTracker, permuter: TokenPermuter | None,
                 positions: Sequence[float] | None = None):
        self.run = run
        self.tracker = tracker
        self.permuter = permuter
        self.positions = positions  # the Taylor variable per step (sigmas); None: step index
        # per context, one action letter per step (tuples: dynamo cannot subscript a str)
        self.actions = {c: tuple(a) for c, a in run.schedule.items()}
        self.histories: dict[str, TaylorHistory] = {}
        self.action = COMPUTE
        self.run_input: torch.Tensor | None = None
        self.computed_steps: list[tuple[str, int]] = []  # (context, step) where the run computed
        self.forecast_calls = 0
        self.peak_bytes = 0

    @property
    def permuted(self) -> bool:
        return self.permuter is not None and self.permuter.active

    def begin(self) -> None:
        """Called at the run's first block: compute, reuse or forecast in this call."""
        state = self.tracker.state
        if state.step == 0:
            self.histories.pop(state.context, None)  # a new generation starts
        planned = self._planned(state)
        self.action = planned if state.context in self.histories else COMPUTE
        if self.action == COMPUTE:
            self.computed_steps.append((state.context, state.step))
        elif self.action == FORECAST:
            self.forecast_calls += 1

    def _planned(self, state) -> str:
        # A call outside "cond"/"uncond" (batched CFG, no cache_context) follows the cond plan.
        actions = self.actions.get(state.context, self.actions.get(FALLBACK_CONTEXT))
        return COMPUTE if actions is None or state.step >= len(actions) else actions[state.step]

    def _position(self) -> float:
        step = self.tracker.state.step
        return float(self.positions[step] if self.positions is not None else step)

    def _history(self) -> TaylorHistory:
        history = self.histories[self.tracker.state.context]
        if history.permuted != self.permuted:
            index = self.permuter.perm if self.permuted else self.permuter.inverse
            history.reorder(index, self.permuted)
        return history

    def replacement(self, run_input: torch.Tensor) -> torch.Tensor:
        """The run's output [B, S, C] on a reuse or forecast call, from its input [B, S, C]."""
        history = self._history()
        if self.action == FORECAST:
            value = history.predict(self._position(), run_input.dtype)
        else:
            value = history.factors[0].to(run_input.dtype)
        return run_input + value if self.run.target == "residual" else value

    def store(self, run_output: torch.Tensor) -> None:
        """Called at the run's last block on a compute call: refresh the history."""
        context = self.tracker.state.context
        value = run_output - self.run_input if self.run.target == "residual" else run_output
        if context not in self.histories:
            order = self.run.order if self.run.forecasts else 0
            dtype = torch.float32 if order else None
            self.histories[context] = TaylorHistory(order, dtype, self.permuted)
        self._history().update(value, self._position())
        self.run_input = None
        self.peak_bytes = max(self.peak_bytes, self.nbytes)

    @property
    def nbytes(self) -> int:
        return sum(h.nbytes for h in self.histories.values())

    def clear_history(self) -> None:
        """A generation ended: cached values are stale (statistics are kept)."""
        self.histories.clear()

    def reset(self) -> None:
        self.histories.clear()
        self.computed_steps.clear()
        self.forecast_calls = 0
        self.peak_bytes = 0


class BlockRunHook(ModelHook):
    """One block of a run: the first block decides and substitutes, the last one stores."""

    _is_stateful = True

    def __init__(self, state: RunState, position: str, hidden_arg: int, hidden_out: Callable):
        super().__init__()
        self.state = state
        self.position = position  # "first", "middle", "last" or "only"
        self.hidden_arg = hidden_arg
        self.hidden_out = hidden_out

    def new_forward(self, module: nn.Module, *args, **kwargs):
        hidden = args[self.hidden_arg]  # [B, S, C]
        first = self.position in ("first", "only")
        if first:
            self.state.begin()
            if self.state.action == COMPUTE:
                self.state.run_input = hidden
        if self.state.action != COMPUTE:
            return self.state.replacement(hidden) if first else hidden
        output = self.fn_ref.original_forward(*args, **kwargs)
        if self.position in ("last", "only"):
            self.state.store(self.hidden_out(output))
        return output

    def reset_state(self, module: nn.Module) -> nn.Module:
        self.state.clear_history()
        return module


def _position(index: int, length: int) -> str:
    if length == 1:
        return "only"
    return "first" if index == 0 else "last" if index == length - 1 else "middle"


def install_block_runs(
    blocks: Mapping[str, nn.Module],
    runs: Sequence[BlockRun],
    tracker: StepTracker,
    permuter: TokenPermuter | None = None,
    *,
    positions: Sequence[float] | None = None,
    hidden_arg: int = 0,
    hidden_out: Callable = lambda output: output,
) -> list[RunState]:
    """Install hooks for each run; ``blocks`` maps block name to module in execution order.

    Args:
        positions: the sigma of each step, for runs that forecast in sigma.
    Returns:
        The run states (``computed_steps`` records which (context, step) computed).
    """
    order = list(blocks)
    states = []
    for run in runs:
        _check_consecutive(run.blocks, order)
        state = RunState(run, tracker, permuter, positions if run.variable == "sigma" else None)
        for i, name in enumerate(run.blocks):
            hook = BlockRunHook(state, _position(i, len(run.blocks)), hidden_arg, hidden_out)
            HookRegistry.check_if_exists_or_initialize(blocks[name]).register_hook(hook, CACHE_HOOK)
        states.append(state)
    return states


def remove_block_runs(blocks: Mapping[str, nn.Module]) -> None:
    for module in blocks.values():
        if hasattr(module, "_diffusers_hook"):
            module._diffusers_hook.remove_hook(CACHE_HOOK, recurse=False)


def _check_consecutive(run: Sequence[str], order: list[str]) -> None:
    missing = [name for name in run if name not in order]
    if missing:
        raise ValueError(f"block run names blocks this model does not have: {missing}")
    first = order.index(run[0])
    if list(run) != order[first : first + len(run)]:
        raise ValueError(f"block run {list(run)} is not a sequence of consecutive blocks")
