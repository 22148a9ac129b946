"""What the context-parallel tests share: the Ulysses config, forwards under it, plan specs."""

from __future__ import annotations

import dataclasses

import torch
from diffusers import ContextParallelConfig

from ditplan.policy.plan import AttentionSpec, Plan
from ditplan.runtime.adapters.base import get_adapter
from ditplan.runtime.sparse import SparseProcessorBase


def ulysses() -> ContextParallelConfig:
    return ContextParallelConfig(ulysses_degree=2)


def with_attention(plan: Plan, spec: AttentionSpec, runs: tuple = ()) -> Plan:
    """``plan`` with ``spec`` in every layer and ``runs`` as its block runs."""
    layers = {name: dataclasses.replace(layer, attention=spec)
              for name, layer in plan.layers.items()}
    return dataclasses.replace(plan, layers=layers, runs=runs)


def carries_config(model, sparse_layers: int) -> bool:
    """``sparse_layers`` of the model's self-attention layers run ditplan's processor, and every
    processor, and the original a sparse one wraps, has the model's context-parallel config."""
    processors = [attn.processor for _, attn in get_adapter(model).attention_layers(model)]
    originals = [p.original for p in processors if isinstance(p, SparseProcessorBase)]
    return len(originals) == sparse_layers and all(
        p._parallel_config is model._parallel_config for p in processors + originals)


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
