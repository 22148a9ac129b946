"""Block runs: per CFG branch and step a run of blocks computes, reuses or forecasts its value."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import torch
from diffusers.hooks import HookRegistry, ModelHook
from torch import nn

from ditplan.policy.plan import COMPUTE, FORECAST, BlockRun
from ditplan.runtime.context import StepTracker
from ditplan.runtime.hooks import remove_named_hook

if TYPE_CHECKING:
    from ditplan.runtime.layout import BlockStreams, StreamIO

CACHE_HOOK = "ditplan_block_cache"
FALLBACK_CONTEXT = "cond"


class TaylorHistory:
    """Finite-difference factors of one run's value in one CFG context, and its forecast.

    ``factors[k]`` [B, S, C] is a k-th difference of the value in the run's variable (step index
    or sigma) over the last computed positions (``positions``, newest first). Extrapolation
    "taylor" is diffusers' TaylorSeer: factor k + 1 = (new factor k - previous factor k) / the
    newest gap, forecast as a Taylor series around the last computed position. "newton" divides
    by the span of the points each difference covers (Newton's divided differences) and
    forecasts with the polynomial through those points, exact for a quadratic whatever the gaps
    (TaylorSeer's order 2 is not, and on uneven gaps neither is its second factor).
    Order 0 (reuse) keeps the value in its own dtype; forecasting factors are float32.
    """

    def __init__(self, order: int, extrapolation: str = "taylor"):
        self.order = order
        self.newton = extrapolation == "newton"
        self.factors: list[torch.Tensor] = []
        self.positions: list[float] = []  # computed positions, newest first (order + 1 kept)

    @property
    def position(self) -> float | None:
        """The last computed position (None before the first)."""
        return self.positions[0] if self.positions else None

    def update(self, value: torch.Tensor, position: float) -> None:
        """Refresh the factors with the value [B, S, C] computed at ``position``."""
        if self.order == 0:  # reuse only: a plain store, traced without a graph break
            self.factors = [value]
            return
        self._update_taylor(value, position)

    @torch.compiler.disable
    def _update_taylor(self, value: torch.Tensor, position: float) -> None:
        # Out of the compiled graph (as diffusers' TaylorSeer): the position gaps are host floats
        new = [value.float()]
        for k, previous in enumerate(self.factors[: self.order]):
            span = position - self.positions[k if self.newton else 0]
            new.append((new[-1] - previous) / span)
        self.factors = new
        self.positions = [position, *self.positions][: self.order + 1]

    @torch.compiler.disable  # the offset is a host float: no per-offset recompiles
    def predict(self, position: float, dtype: torch.dtype) -> torch.Tensor:
        """The forecast at ``position`` [B, S, C] (order 0 alone: the last value)."""
        out = self.factors[0].to(dtype)
        weight = 1.0
        for k, factor in enumerate(self.factors[1:], start=1):
            if self.newton:  # prod over j < k of (position - positions[j])
                weight *= position - self.positions[k - 1]
            else:
                weight = (position - self.positions[0]) ** k / math.factorial(k)
            out = out + factor.to(dtype) * weight
        return out

    @property
    def nbytes(self) -> int:
        return sum(f.numel() * f.element_size() for f in self.factors)


class RunState:
    """Histories of one run per CFG branch, and the decision its blocks share for this call.

    A run carries one stream (video) or two (video and text, joint-attention blocks); each
    stream keeps its own history per branch, so a branch's text (whose length may differ
    between branches) never mixes with another's. Streams travel as tuples in
    :attr:`StreamIO.streams` order, [B, S, C] each.

    A call normally carries one branch (the pipeline's ``cache_context``). A call outside every
    context the plan schedules, with ``batch_order`` set, carries the branches stacked along the
    batch (batched CFG, e.g. ("uncond", "cond")): each branch part then follows its own schedule,
    and when only some parts compute, the run's blocks see only those parts of the batch.
    """

    def __init__(self, run: BlockRun, tracker: StepTracker,
                 positions: Sequence[float] | None = None,
                 batch_order: tuple[str, ...] | None = None, first_step: int = 0):
        self.run = run
        self.first_step = first_step  # the transformer's first step: a generation starts there
        self.tracker = tracker
        self.positions = positions  # the Taylor variable per step (sigmas); None: step index
        self.batch_order = batch_order
        # per context, one action letter per step (tuples: dynamo cannot subscript a str)
        self.actions = {c: tuple(a) for c, a in run.schedule.items()}
        self.histories: dict[str, tuple[TaylorHistory, ...]] = {}  # per branch: one per stream
        self.branches: tuple[str, ...] = ()  # this call's branches, in batch order
        self.branch_actions: tuple[str, ...] = ()
        self.full_batch = 0
        self.run_input: tuple[torch.Tensor, ...] | None = None  # per stream [b, S, C]: computing
        self.replaced: list = []  # per branch part: its streams' outputs if skipped, else None
        self.computed_steps: list[tuple[str, int]] = []  # (branch, step) where the run computed
        self.branch_calls = 0
        self.forecast_calls = 0
        self.peak_bytes = 0

    @property
    def computing(self) -> bool:
        return COMPUTE in self.branch_actions

    @property
    def partial(self) -> bool:
        """Some branch parts of this call compute and others do not (batched CFG only)."""
        return self.computing and any(a != COMPUTE for a in self.branch_actions)

    def begin(self) -> None:
        """Called at the run's first block: each branch of the call computes, reuses or
        forecasts."""
        state = self.tracker.state
        batched = state.context not in self.actions and self.batch_order is not None
        self.branches = self.batch_order if batched else (state.context,)
        actions = []
        for branch in self.branches:
            if state.step == self.first_step:
                self.histories.pop(branch, None)  # a new generation starts
            planned = self._planned(branch, state.step)
            action = planned if branch in self.histories else COMPUTE
            if action == COMPUTE:
                self.computed_steps.append((branch, state.step))
            elif action == FORECAST:
                self.forecast_calls += 1
            actions.append(action)
        self.branch_actions = tuple(actions)
        self.branch_calls += len(self.branches)

    def _planned(self, branch: str, step: int) -> str:
        # A call outside the scheduled contexts without batch_order follows the cond plan.
        actions = self.actions.get(branch, self.actions.get(FALLBACK_CONTEXT))
        return COMPUTE if actions is None or step >= len(actions) else actions[step]

    def _position(self) -> float:
        step = self.tracker.state.step
        return float(self.positions[step] if self.positions is not None else step)

    def _replacement(self, branch: str, action: str, parts: tuple) -> tuple:
        """A skipped branch part's run output from its run input, per stream [b, S, C]."""
        return tuple(self._replace_stream(history, action, part)
                     for history, part in zip(self.histories[branch], parts, strict=True))

    def _replace_stream(self, history: TaylorHistory, action: str,
                        part: torch.Tensor) -> torch.Tensor:
        if action == FORECAST:
            value = history.predict(self._position(), part.dtype)
        else:
            value = history.factors[0].to(part.dtype)
        return part + value if self.run.target == "residual" else value

    def _branch_parts(self, streams: tuple[torch.Tensor, ...], parts: int) -> list[tuple]:
        # per stream [n * b, S, C] -> per branch part, its streams [b, S, C] each
        return list(zip(*(_split(x, parts) for x in streams), strict=True))

    def enter(self, streams: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...] | None:
        """At the first block, with the run input's streams: keeps the computing parts as
        ``run_input`` and returns None, or returns the run's whole output when none computes."""
        self.full_batch = streams[0].shape[0]
        parts = self._branch_parts(streams, len(self.branches))
        self.replaced = [None if a == COMPUTE else self._replacement(b, a, p)
                         for b, a, p in zip(self.branches, self.branch_actions, parts,
                                            strict=True)]
        computing = [p for p, a in zip(parts, self.branch_actions, strict=True) if a == COMPUTE]
        if not computing:
            return _cat_streams(self.replaced)
        self.run_input = streams if len(computing) == len(parts) else _cat_streams(computing)
        return None

    def batch_slice(self, args: tuple, kwargs: dict, streams: frozenset) -> tuple[tuple, dict]:
        """The computing branch parts of every other batch-sized block argument (``streams``:
        the stream arguments' positions and names, left as they are)."""
        def cut(key, x):
            if key in streams or not torch.is_tensor(x) or x.shape[0] != self.full_batch:
                return x
            keep = [p for p, a in zip(_split(x, len(self.branches)), self.branch_actions,
                                      strict=True) if a == COMPUTE]
            return _cat(keep)

        return (tuple(cut(i, x) for i, x in enumerate(args)),
                {k: cut(k, x) for k, x in kwargs.items()})

    def leave(self, run_output: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        """At the last block, with the run output's streams: refresh the computed branches'
        histories; the full output's streams."""
        index = [i for i, a in enumerate(self.branch_actions) if a == COMPUTE]
        outputs = self._branch_parts(run_output, len(index))
        inputs = self._branch_parts(self.run_input, len(index))
        for i, out, inp in zip(index, outputs, inputs, strict=True):
            self._store(self.branches[i], out, inp)
        self.run_input = None
        self.peak_bytes = max(self.peak_bytes, self.nbytes)
        if not self.partial:
            return run_output
        parts = list(self.replaced)
        for i, out in zip(index, outputs, strict=True):
            parts[i] = out
        return _cat_streams(parts)

    def _store(self, branch: str, run_output: tuple, run_input: tuple) -> None:
        if branch not in self.histories:
            order = self.run.order if self.run.forecasts else 0
            self.histories[branch] = tuple(TaylorHistory(order, self.run.extrapolation)
                                           for _ in run_output)
        for history, out, inp in zip(self.histories[branch], run_output, run_input, strict=True):
            history.update(out - inp if self.run.target == "residual" else out, self._position())

    @property
    def nbytes(self) -> int:
        return sum(h.nbytes for streams in self.histories.values() for h in streams)

    def clear_history(self) -> None:
        """A generation ended: cached values are stale (statistics are kept)."""
        self.histories.clear()

    def reset(self) -> None:
        self.histories.clear()
        self.computed_steps.clear()
        self.branch_calls = 0
        self.forecast_calls = 0
        self.peak_bytes = 0


def _cat(parts: list) -> torch.Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def _cat_streams(parts: list[tuple]) -> tuple[torch.Tensor, ...]:
    # per branch part, its streams [b, S, C] -> per stream, the parts joined along the batch
    return tuple(_cat(list(stream)) for stream in zip(*parts, strict=True))


def _split(x: torch.Tensor, parts: int) -> tuple[torch.Tensor, ...]:
    # [n * b, ...] -> n tensors [b, ...] along the batch (no op for one part)
    return x.chunk(parts) if parts > 1 else (x,)


class BlockRunHook(ModelHook):
    """One block of a run: the first block decides and substitutes, the last one stores.

    A block that does not compute returns its streams in its own output order (a skipped run's
    output at the first block, its inputs passed through at the others)."""

    _is_stateful = True

    def __init__(self, state: RunState, position: str, streams: BlockStreams):
        super().__init__()
        self.state = state
        self.position = position  # "first", "middle", "last" or "only"
        self.streams = streams

    def new_forward(self, module: nn.Module, *args, **kwargs):
        state, streams = self.state, self.streams
        if self.position in ("first", "only"):
            state.begin()
            skipped = state.enter(streams.inputs(args, kwargs))  # (video, text?) [B, S, C]
            if skipped is not None:
                return streams.native(skipped)
            args, kwargs = streams.with_inputs(args, kwargs, state.run_input)
        elif not state.computing:
            # the first block already gave the run's output
            return streams.native(streams.inputs(args, kwargs))
        if state.partial:
            args, kwargs = state.batch_slice(args, kwargs, streams.keys)
        output = self.fn_ref.original_forward(*args, **kwargs)
        if self.position not in ("last", "only"):
            return output
        full = state.leave(streams.outputs(output))
        return streams.native(full) if state.partial else output

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
    *,
    io: Mapping[str, StreamIO],
    positions: Sequence[float] | None = None,
    batch_order: tuple[str, ...] | None = None,
    first_step: int = 0,
) -> list[RunState]:
    """Install hooks for each run; ``blocks`` maps block name to module in execution order.

    Args:
        io: each block's stream IO by name (which argument and output carry hidden states).
        positions: the sigma of each step, for runs that forecast in sigma.
        batch_order: the CFG branches a call without a scheduled context stacks along its
            batch (batched CFG); None: such a call follows the cond schedule whole.
    Returns:
        The run states (``computed_steps`` records which (context, step) computed).
    """
    order = list(blocks)
    states = []
    for run in runs:
        _check_consecutive(run.blocks, order)
        kinds = {io[name].streams for name in run.blocks}
        if len(kinds) > 1:
            raise ValueError(f"block run {list(run.blocks)} mixes blocks of different streams "
                             f"{sorted(kinds)}; a run's blocks must carry the same streams")
        state = RunState(run, tracker, positions if run.variable == "sigma" else None,
                         batch_order, first_step)
        for i, name in enumerate(run.blocks):
            streams = io[name].bind(blocks[name].forward)
            hook = BlockRunHook(state, _position(i, len(run.blocks)), streams)
            HookRegistry.check_if_exists_or_initialize(blocks[name]).register_hook(hook, CACHE_HOOK)
        states.append(state)
    return states


def remove_block_runs(blocks: Mapping[str, nn.Module]) -> None:
    remove_named_hook(blocks.values(), CACHE_HOOK)


def _check_consecutive(run: Sequence[str], order: list[str]) -> None:
    missing = [name for name in run if name not in order]
    if missing:
        raise ValueError(f"block run names blocks this model does not have: {missing}")
    first = order.index(run[0])
    if list(run) != order[first : first + len(run)]:
        raise ValueError(f"block run {list(run)} is not a sequence of consecutive blocks")
