"""Model identity: a stable hash of a transformer's config (and optionally of its weights)."""

from __future__ import annotations

import hashlib
import json

import torch
from torch import nn

# Config keys that describe where a model came from, not what it computes.
_PROVENANCE_KEYS = ("_class_name", "_diffusers_version", "_name_or_path", "_use_default_values")


def _canonical(value):
    if isinstance(value, dict):
        return {str(k): _canonical(v) for k, v in sorted(value.items())}
    if isinstance(value, (list, tuple)):
        return [_canonical(v) for v in value]
    return value


def config_hash(transformer: nn.Module) -> str:
    """sha256 (hex) of the transformer's diffusers config, canonical JSON, provenance excluded."""
    config = {k: v for k, v in dict(transformer.config).items() if k not in _PROVENANCE_KEYS}
    text = json.dumps(_canonical(config), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def weights_hash(transformer: nn.Module) -> str:
    """sha256 (hex) over parameter names, shapes and values, in name order.

    Floating tensors are hashed rounded to bfloat16, so the same weights loaded in float32 on a
    CPU and in bfloat16 on a GPU have one hash: a plan profiled in one precision applies in the
    other. (float16 weights round twice and may hash apart; profile those in float16.)
    """
    digest = hashlib.sha256()
    for name, tensor in sorted(transformer.state_dict().items()):
        tensor = tensor.detach()
        if tensor.is_floating_point():
            tensor = tensor.to(torch.bfloat16)
        tensor = tensor.contiguous().cpu()
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype};".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def model_fingerprint(transformer: nn.Module, *, with_weights: bool = False) -> dict:
    """``{"transformer_class", "config_hash", "weights_hash"}`` as plans and traces record it."""
    return {
        "transformer_class": type(transformer).__name__,
        "config_hash": config_hash(transformer),
        "weights_hash": weights_hash(transformer) if with_weights else None,
    }
