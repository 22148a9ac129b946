"""The method contract (family, setting, ``install(pipe) -> Installed``) and the simple methods."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ditplan.policy.plan import AttentionSpec
from ditplan.runtime.apply import apply_sparse_attention

# RainFusion2.0 as published: nominal density 0.2 (80% sparsity, MindIE-SD's recommended start
# for video), first-frame sink, no profiling; the deployments keep about the first 20% of steps
# dense ("start0 is not acceptable"), see /work/shared/reference/papers.md section 1.3.
RAINFUSION_DENSITY = 0.2
RAINFUSION_DENSE_FRACTION = 0.2
# Its published permutation: 8 x 8 spatial tiles within each frame, whatever the workload's tile
# (with the sink on, a tile spanning frames would force its whole first tile-frame).
RAINFUSION_TILE = (1, 8, 8)

logger = logging.getLogger(__name__)


class NotApplicable(Exception):
    """A method cannot run on this model or workload; the message says why (recorded, not fatal)."""


@dataclass
class Installed:
    """What a method put on a pipeline: ``undo()`` removes it, ``stats()`` reports on it."""

    undo: Callable[[], None]
    stats: Callable[[], dict] = dict
    reset: Callable[[], None] = lambda: None
    plan_key: str | None = None  # what runs, for a compiled plan: rows that share it share results

    def __call__(self) -> None:
        self.undo()


@dataclass(frozen=True)
class Method:
    """One method at one setting.

    family: the curve it belongs to in the plot (e.g. "ditplan", "diffusers-magcache").
    name: unique row key, "family/setting". params: JSON-ready settings.
    install: takes a pipeline (or a bare transformer, at scale) and returns an Installed.
    """

    family: str
    setting: str
    install: Callable[[Any], Installed]
    params: dict = field(default_factory=dict)
    notes: str = ""

    @property
    def name(self) -> str:
        return f"{self.family}/{self.setting}"


def method_row(method: Method, target, measure: Callable[[Installed], dict],
               where: str = "") -> dict:
    """One method's result row: install on ``target``, ``measure(installed)``, always undo.

    Not applicable and failed methods become rows with that status and the reason, so the other
    methods still run. ``measure`` returns the ok row's fields; ``where`` tags the log lines.
    """
    row = {"family": method.family, "setting": method.setting, "method": method.name,
           "params": method.params, "notes": method.notes}
    try:
        installed = method.install(target)
    except NotApplicable as reason:
        logger.info("%s%s: not applicable: %s", method.name, where, reason)
        return {**row, "status": "not_applicable", "reason": str(reason)}
    except Exception as error:  # recorded in the row; the other methods still run
        logger.exception("%s could not be installed%s", method.name, where)
        return {**row, "status": "failed", "reason": f"{type(error).__name__}: {error}"}
    try:
        row.update(status="ok", **measure(installed))
    except Exception as error:  # recorded in the row; the other methods still run
        logger.exception("%s failed%s", method.name, where)
        row.update(status="failed", reason=f"{type(error).__name__}: {error}")
    finally:
        installed.undo()
    return row


def transformer_of(pipe_or_transformer):
    """The transformer of a pipeline, or the argument itself when it is one."""
    return getattr(pipe_or_transformer, "transformer", pipe_or_transformer)


def dense_repeat() -> Method:
    """Dense again: the run-to-run noise floor of the timing (and of the outputs)."""
    return Method("dense", "repeat", lambda pipe: Installed(undo=lambda: None))


def dense_warmup_steps(steps: int, fraction: float) -> tuple[int, ...]:
    """The first ``ceil(fraction * steps)`` step indices (at least one)."""
    return tuple(range(max(1, math.ceil(fraction * steps))))


def rainfusion(density: float, *, steps: int, block_size: int, backend: str) -> Method:
    """RainFusion2.0 as published: one uniform density in every layer, 1 x 8 x 8 tiles, sink on,
    dense warm-up."""
    spec = AttentionSpec(density=density, block_size=block_size, tile=RAINFUSION_TILE, sink=True,
                         dense_steps=dense_warmup_steps(steps, RAINFUSION_DENSE_FRACTION))

    def install(pipe) -> Installed:
        handle = apply_sparse_attention(transformer_of(pipe), spec, backend=backend,
                                        num_inference_steps=steps)
        return Installed(undo=handle.remove, stats=lambda: _achieved_density(handle.layers),
                         reset=lambda: _reset_layers(handle.layers))

    params = dict(density=density, dense_steps=len(spec.dense_steps), block_size=block_size,
                  tile=list(RAINFUSION_TILE), sink=True)
    return Method("rainfusion2", f"d={density:g}", install, params)


def _achieved_density(layers) -> dict:
    values = [d for d in (layer.achieved_density() for layer in layers) if d is not None]
    return {"attention_density": sum(values) / len(values)} if values else {}


def _reset_layers(layers) -> None:
    for layer in layers:
        layer.reset_stats()
