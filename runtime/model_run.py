"""Whole-call runs (target "model"): a transformer hook returning the cached or forecast output."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from torch import nn

from ditplan.policy.plan import BlockRun
from ditplan.runtime.cache import RunState
from ditplan.runtime.context import StepTracker

MODEL_RUN_HOOK = "ditplan_model_run"


class ModelRunHook(ModelHook):
    """Skips the transformer's whole call (embeddings, blocks, head) where its run does not
    compute, returning the run's reused or forecast output in the call's own output type.

    Registered inside the step tracker, so the tracker has read the call's (step, branch)
    before this hook decides. Batched CFG calls follow each branch's schedule (a model run has
    one schedule for every branch, so the branches of a call always agree)."""

    _is_stateful = True

    def __init__(self, state: RunState):
        super().__init__()
        self.state = state

    def new_forward(self, module: nn.Module, *args, **kwargs):
        state = self.state
        state.begin()
        latents = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]  # [B, ...]
        skipped = state.enter((latents,))
        if skipped is not None:
            sample = skipped[0]  # [B, ...] the model output's shape
            return (sample,) if kwargs.get("return_dict", True) is False else (
                Transformer2DModelOutput(sample=sample))
        output = self.fn_ref.original_forward(*args, **kwargs)
        state.leave((model_output(output),))
        return output

    def reset_state(self, module: nn.Module) -> nn.Module:
        self.state.clear_history()
        return module


def install_model_runs(transformer: nn.Module, runs: Sequence[BlockRun], tracker: StepTracker,
                       *, positions: Sequence[float] | None = None,
                       batch_order: tuple[str, ...] | None = None,
                       first_step: int = 0) -> list[RunState]:
    """Hook the plan's run with target "model" (at most one) onto ``transformer``; call this
    before the step tracker is registered, so that the tracker wraps it. Returns its state."""
    states = []
    for run in (r for r in runs if r.whole_call):
        state = RunState(run, tracker, positions if run.variable == "sigma" else None,
                         batch_order, first_step)
        HookRegistry.check_if_exists_or_initialize(transformer).register_hook(
            ModelRunHook(state), MODEL_RUN_HOOK)
        states.append(state)
    return states


def remove_model_runs(transformer: nn.Module) -> None:
    registry = HookRegistry.check_if_exists_or_initialize(transformer)
    if registry.get_hook(MODEL_RUN_HOOK) is not None:
        registry.remove_hook(MODEL_RUN_HOOK, recurse=False)


def model_output(output) -> torch.Tensor:
    """The sample of a transformer call's output (tuple or output dataclass)."""
    return output[0] if isinstance(output, tuple) else output.sample
