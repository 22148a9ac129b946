"""Map each transformer call to (step, CFG branch): diffusers' cache_context, else counting."""

from __future__ import annotations

from dataclasses import dataclass

from diffusers.hooks import HookRegistry, ModelHook
from diffusers.hooks.hooks import StateManager
from torch import nn

STEP_TRACKER_HOOK = "ditplan_step_tracker"
DEFAULT_CONTEXT = "default"
# diffusers' guiders name the CFG branches by their predictions (HunyuanVideo-1.5's pipeline).
GUIDER_CONTEXTS = {"pred_cond": "cond", "pred_uncond": "uncond"}


@dataclass
class StepState:
    """The step and CFG branch of the transformer call in flight (host values, no tensors)."""

    step: int = 0
    context: str = DEFAULT_CONTEXT
    num_inference_steps: int | None = None  # as the pipeline announced it, when it does


class _ContextProbe(StateManager):
    """Receives the pipeline's ``cache_context`` like diffusers' own stateful hooks do."""

    def __init__(self):
        super().__init__(StepState)

    @property
    def current(self):
        return self._context


class StepTracker(ModelHook):
    """Transformer hook that sets :attr:`state` before every forward.

    The step comes from the pipeline's ``cache_context(name, step_index=i)`` when it gives one
    (a guider's names become "cond" and "uncond"); otherwise calls are counted per context
    name (modulo ``num_inference_steps`` when known), as MagCache does. Listeners are called
    with the new state before the forward runs.
    """

    _is_stateful = True

    def __init__(self, num_inference_steps: int | None = None):
        super().__init__()
        self.num_inference_steps = num_inference_steps
        self.probe = _ContextProbe()
        self.state = StepState()
        self.listeners: list = []
        self._calls: dict[str, int] = {}
        self.calls_seen = 0  # lifetime count for statistics; diffusers' end-of-generation reset
        # (reset_state) restarts step counting but keeps this

    def pre_forward(self, module: nn.Module, *args, **kwargs):
        self.state = self._next_state()
        for listener in self.listeners:
            listener(self.state)
        return args, kwargs

    def _next_state(self) -> StepState:
        ctx = self.probe.current
        name = DEFAULT_CONTEXT if ctx is None else (ctx if isinstance(ctx, str) else ctx.name)
        name = GUIDER_CONTEXTS.get(name, name)
        step_index = getattr(ctx, "step_index", None)
        calls = self._calls.get(name, 0)
        self._calls[name] = calls + 1
        self.calls_seen += 1
        if step_index is None:
            step_index = calls % self.num_inference_steps if self.num_inference_steps else calls
        total = getattr(ctx, "num_inference_steps", None)
        return StepState(step=int(step_index), context=name, num_inference_steps=total)

    def reset_state(self, module: nn.Module) -> nn.Module:
        self._calls.clear()
        self.state = StepState()
        return module


def install_step_tracker(
    transformer: nn.Module, num_inference_steps: int | None = None,
    tracker: StepTracker | None = None,
) -> StepTracker:
    """Register ``tracker`` (default: a new :class:`StepTracker`) on ``transformer``, outside
    every hook registered before it (one per model; refuses a second)."""
    refuse_applied(transformer)
    tracker = tracker or StepTracker(num_inference_steps)
    HookRegistry.check_if_exists_or_initialize(transformer).register_hook(
        tracker, STEP_TRACKER_HOOK)
    return tracker


def refuse_applied(transformer: nn.Module) -> None:
    """Raises when a ditplan plan (its step tracker) is already on ``transformer``."""
    registry = HookRegistry.check_if_exists_or_initialize(transformer)
    if registry.get_hook(STEP_TRACKER_HOOK) is not None:
        raise ValueError(
            "a ditplan plan is already applied to this transformer; call handle.remove() first"
        )


def remove_step_tracker(transformer: nn.Module) -> None:
    HookRegistry.check_if_exists_or_initialize(transformer).remove_hook(STEP_TRACKER_HOOK)
