"""What the context-parallel tests share: the Ulysses config, forwards under it, plan specs."""

from __future__ import annotations

import dataclasses

import torch
from diffusers import ContextParallelConfig

from ditplan.policy.plan import AttentionSpec, Plan


def ulysses() -> ContextParallelConfig:
    return ContextParallelConfig(ulysses_degree=2)


def with_attention(plan: Plan, spec: AttentionSpec, runs: tuple = ()) -> Plan:
    """``plan`` with ``spec`` in every layer and ``runs`` as its block runs."""
    layers = {name: dataclasses.replace(layer, attention=spec)
              for name, layer in plan.layers.items()}
    return dataclasses.replace(plan, layers=layers, runs=runs)


def forward(model, inputs: dict) -> torch.Tensor:
    """The output as a finished tensor: without a permutation (dense plans, plain CP) FLUX
    returns ``proj_out``'s gather itself, an AsyncCollectiveTensor, which a torch op waits
    for but pickling to the test process does not."""
    with torch.no_grad():  # under CP diffusers' hooks take tuples, not output dataclasses
        return model(**inputs, return_dict=False)[0].clone()


def cfg_steps(model, inputs: dict, steps: int) -> list[torch.Tensor]:
    """``steps`` steps of a cond then an uncond forward each, in their cache contexts."""
    outs = []
    for step in range(steps):
        for context in ("cond", "uncond"):
            with model.cache_context(context, step_index=step):
                outs.append(forward(model, inputs))
    return outs
