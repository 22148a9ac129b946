"""Map a plan compiled on the reference model onto a larger model of the same family, for the
speed-at-scale run: layer settings by relative depth, step schedules by relative position."""

from __future__ import annotations

import dataclasses

import torch

from ditplan.policy.plan import AttentionSpec, LayerPlan, ModelIdentity, Plan, Workload
from ditplan.runtime.adapters.base import get_adapter
from ditplan.runtime.fingerprint import config_hash


def resample_steps(new_steps: int, old_steps: int) -> list[int]:
    """For each new step, the old step at the same relative position (nearest)."""
    scale = (old_steps - 1) / max(new_steps - 1, 1)
    return [min(old_steps - 1, round(s * scale)) for s in range(new_steps)]


def _resampled(sigmas, steps_from) -> tuple[float, ...] | None:
    """The source schedule's sigmas at the source steps each target step is drawn from."""
    return None if sigmas is None else tuple(sigmas[s] for s in steps_from)


def _spec(spec: AttentionSpec, source: list[int]) -> AttentionSpec:
    dense = tuple(s for s, old in enumerate(source) if old in spec.dense_steps)
    return dataclasses.replace(spec, dense_steps=dense, head_densities=None)


def transfer_plan(plan: Plan, transformer, *, steps: int, latents_shape: tuple[int, ...],
                  guidance_scale: float) -> Plan:
    """The plan's settings on ``transformer`` for ``steps`` steps on latents ``latents_shape``.

    Per-head densities are dropped (head counts differ; the layer density is their maximum).
    Each source run maps to the blocks drawn from it, with its schedule resampled to the steps.

    Args:
        latents_shape: [B, C, F, H, W]; the workload records F, H, W in latent units.
    """
    adapter = get_adapter(transformer)
    blocks = [name for name, _ in adapter.blocks(transformer)]
    attention = [name for name, _ in adapter.attention_layers(transformer)]
    old = plan.block_order
    source = {b: old[i * len(old) // len(blocks)] for i, b in enumerate(blocks)}
    steps_from = resample_steps(steps, plan.workload.steps)
    layers = {b: LayerPlan(role=plan.layers[source[b]].role, attention_module=a,
                           attention=_spec(plan.layers[source[b]].attention, steps_from))
              for b, a in zip(blocks, attention, strict=True)}
    runs = []
    for run in plan.runs:
        mapped = tuple(b for b in blocks if source[b] in run.blocks)
        if mapped:
            schedule = {c: "".join(a[s] for s in steps_from) for c, a in run.schedule.items()}
            runs.append(dataclasses.replace(run, blocks=mapped, schedule=schedule))
    latents = torch.empty(latents_shape, device="meta")  # the forward's input, no storage
    layout = adapter.token_layout(transformer, (), {"hidden_states": latents})
    _, _, frames, height, width = latents_shape
    workload = Workload(steps=steps, height=height, width=width, frames=frames,
                        guidance_scale=guidance_scale, cfg=guidance_scale > 1,
                        tokens_grid=layout.grid, sigmas=_resampled(plan.workload.sigmas,
                                                                   steps_from))
    roles = dataclasses.replace(plan.provenance.roles, margins={})
    return Plan(identity=ModelIdentity(type(transformer).__name__, config_hash(transformer)),
                workload=workload, provenance=dataclasses.replace(plan.provenance, roles=roles),
                defaults=plan.defaults, block_order=tuple(blocks), layers=layers,
                runs=tuple(runs))
