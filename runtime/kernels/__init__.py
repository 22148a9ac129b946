"""Sparse-attention kernels: block selection, tile permutation, and the one block-sparse entry."""

from __future__ import annotations

import torch

from . import dense, flex, torch_sparse  # noqa: F401  (import registers the backends)
from .block_map import (
    ForcedBlocks,
    block_mean_scores,
    forced_blocks,
    select_blocks,
    select_blocks_reference,
)
from .permute import (
    first_frame_mask,
    invert_permutation,
    permute_tokens,
    tile_permutation,
    tile_permutation_reference,
)
from .reference import expand_block_map, masked_attention_reference
from .registry import Backend, check_attention_inputs, resolve_backend

__all__ = [
    "Backend",
    "ForcedBlocks",
    "block_mean_scores",
    "block_sparse_attention",
    "expand_block_map",
    "first_frame_mask",
    "forced_blocks",
    "invert_permutation",
    "masked_attention_reference",
    "permute_tokens",
    "select_blocks",
    "select_blocks_reference",
    "tile_permutation",
    "tile_permutation_reference",
]


def block_sparse_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_map: torch.Tensor,
    *, block_size: int = 128, scale: float | None = None, backend: Backend | str = "auto",
) -> torch.Tensor:
    """Softmax attention computed only on the kept (query block, key block) pairs.

    Args:
        q, k, v: [B, H, S, D], one floating dtype, one device.
        block_map: bool [B|1, H|1, ceil(S/block_size), ceil(S/block_size)], True = compute;
            the last block may be partial (S need not be a multiple of block_size).
        block_size: 64 or 128.
        scale: softmax scale; 1/sqrt(D) when None.
        backend: "auto" (flex on CUDA when available, else torch), "flex", "torch" or "dense".
            A backend unavailable on the device falls back to "torch" with one warning.

    Returns:
        [B, H, S, D] in q's dtype; a query row with no kept key gives 0.

    Raises:
        ValueError: bad shapes, dtypes, block size, block map, or an unknown backend name.
    """
    check_attention_inputs(q, k, v, block_map, block_size)
    spec = resolve_backend(backend, q.device)
    return spec.fn(q, k, v, block_map, block_size=block_size, scale=scale)  # [B, H, S, D]
