"""Sparse attention's output error against dense per density: dropped blocks left out or estimated.

The recall curves say how much attention mass a mask keeps; they cannot say whether estimating
the dropped key blocks from their block means (the runtime's ``estimate_heads``) brings the
output closer to dense or further from it: that depends on how keys and values vary inside the
dropped blocks, which differs from head to head. So the profiler (with ``--output-error``)
measures both outputs against dense attention, per head, with the runtime's own
block-mean-predicted masks and kernels, and ``--estimate-dropped measured`` estimates only where
the measurement says it helps.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ditplan.profiler.metrics import predicted_block_maps
from ditplan.runtime.kernels import estimate_dropped_blocks, resolve_backend
from ditplan.runtime.kernels.block_map import ForcedBlocks
from ditplan.runtime.kernels.reference import key_padding_mask, masked_attention_reference
from ditplan.runtime.kernels.remainder import estimated_attention_reference


def relative_error(out: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
    """||out - dense|| / ||dense|| over tokens and channels: [B, H, S, D] -> [B, H] float32
    (float64 for float64 inputs); 0 where dense is 0 everywhere and out equals it."""
    dtype = torch.float64 if dense.dtype == torch.float64 else torch.float32
    diff = (out.to(dtype) - dense.to(dtype)).pow(2).sum(dim=(-1, -2)).sqrt()
    norm = dense.to(dtype).pow(2).sum(dim=(-1, -2)).sqrt()
    return diff / norm.clamp(min=torch.finfo(dtype).tiny)


def output_errors(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, block_size: int,
    densities: tuple[float, ...], forced: ForcedBlocks | None,
    key_valid: torch.Tensor | None = None, block_maps: list[torch.Tensor] | None = None,
) -> torch.Tensor:
    """Relative output error of sparse attention against dense at each density.

    Args:
        q, k, v: [B, H, S, D], tokens in the runtime's (permuted) order.
        block_size: the runtime's block size.
        densities: nominal densities (the masks select_blocks builds from block means).
        forced: always-kept blocks, or None.
        key_valid: int [B] valid keys (the rest padding), or None.
        block_maps: ``metrics.predicted_block_maps(q, k, ...)`` for these densities, when the
            caller has them already (the recorder's recall curves use the same maps).

    Returns:
        [B, H, len(densities), 2] float32 (float64 for float64 inputs): the error with the
        dropped blocks left out, then with them estimated from block means.
    """
    padding = None if key_valid is None else key_padding_mask(key_valid, q.shape[2])
    dense = F.scaled_dot_product_attention(q, k, v, attn_mask=padding)  # [B, H, S, D]
    backend = resolve_backend("auto", q.device, key_padding=key_valid is not None)
    if block_maps is None:
        block_maps = predicted_block_maps(q, k, block_size=block_size, densities=densities,
                                          forced=forced)
    errors = []
    for block_map in block_maps:  # [B, H, Qb, Kb] bool, one per density
        out, lse = backend.fn(q, k, v, block_map, block_size=block_size, scale=None,
                              key_valid=key_valid, return_lse=True)
        estimated = estimate_dropped_blocks(q, k, v, block_map, out, lse,
                                            block_size=block_size, key_valid=key_valid)
        errors.append(torch.stack([relative_error(out, dense),
                                   relative_error(estimated, dense)], dim=-1))
    return torch.stack(errors, dim=2)


def output_errors_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, block_size: int,
    densities: tuple[float, ...], forced: ForcedBlocks | None,
    key_valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """output_errors from the float64 oracles (masked dense attention, S x S): tests only."""
    from ditplan.runtime.kernels.block_map import select_blocks_reference
    from ditplan.runtime.kernels.registry import num_blocks

    nb = num_blocks(q.shape[2], block_size)
    every = torch.ones(1, 1, nb, nb, dtype=torch.bool)
    dense = masked_attention_reference(q, k, v, every, block_size=block_size,
                                       key_valid=key_valid)
    errors = []
    for density in densities:
        block_map = select_blocks_reference(q, k, block_size=block_size, density=density,
                                            forced=forced)
        out = masked_attention_reference(q, k, v, block_map, block_size=block_size,
                                         key_valid=key_valid)
        estimated = estimated_attention_reference(q, k, v, block_map, block_size=block_size,
                                                  key_valid=key_valid)
        errors.append(torch.stack([relative_error(out, dense),
                                   relative_error(estimated, dense)], dim=-1))
    return torch.stack(errors, dim=2)
