"""Sparse-attention kernels: block selection, tile permutation, and the one block-sparse entry."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from . import dense, fa4, flex, torch_sparse  # noqa: F401  (import registers the backends)
from .block_lists import lists_from_map, map_from_lists, select_block_lists
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
from .registry import (
    Backend,
    check_attention_inputs,
    check_key_valid,
    check_qkv,
    num_blocks,
    resolve_backend,
)
from .remainder import estimate_dropped_blocks, merge_attention

__all__ = [
    "Backend",
    "ForcedBlocks",
    "block_mean_scores",
    "block_sparse_attention",
    "estimate_dropped_blocks",
    "expand_block_map",
    "first_frame_mask",
    "forced_blocks",
    "invert_permutation",
    "masked_attention_reference",
    "merge_attention",
    "permute_tokens",
    "resolve_backend",
    "select_and_attend",
    "select_block_lists",
    "select_blocks",
    "select_blocks_reference",
    "tile_permutation",
    "tile_permutation_reference",
]


def block_sparse_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_map: torch.Tensor,
    *, block_size: int = 128, scale: float | None = None, backend: Backend | str = "auto",
    key_valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Softmax attention computed only on the kept (query block, key block) pairs.

    Args:
        q, k, v: [B, H, S, D], one floating dtype, one device.
        block_map: bool [B|1, H|1, ceil(S/block_size), ceil(S/block_size)], True = compute;
            the last block may be partial (S need not be a multiple of block_size).
        block_size: 64 or 128.
        scale: softmax scale; 1/sqrt(D) when None.
        backend: "auto" (fa4 on Hopper with flash-attn-4 installed, else flex on CUDA, else
            torch), "fa4", "flex", "torch" or "dense". A backend unavailable on the device falls
            back (fa4 -> flex -> torch) with one warning.
        key_valid: int [B], values in [1, S]: keys at positions >= key_valid[b] are padding,
            never attended (design D7: padded text, a suffix of [video | text]); None: every
            key is valid. `auto` then skips fa4, which takes no padding (asked for by name it
            raises).

    Returns:
        [B, H, S, D] in q's dtype; a query row with no kept (valid) key gives 0.

    Raises:
        ValueError: bad shapes, dtypes, block size, block map, key_valid, an unknown backend
            name, or fa4 with key_valid.
    """
    check_attention_inputs(q, k, v, block_map, block_size, key_valid)
    spec = resolve_backend(backend, q.device, key_padding=key_valid is not None)
    return spec.fn(q, k, v, block_map, block_size=block_size, scale=scale,
                   key_valid=key_valid)  # [B, H, S, D]


def select_and_attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, block_size: int,
    density: float | Sequence[float] | None = None, mass_threshold: float | None = None,
    forced: ForcedBlocks | None = None, backend: Backend | str = "auto",
    key_valid: torch.Tensor | None = None, estimate_dropped: bool | Sequence[bool] = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """select_blocks then block_sparse_attention; for fa4 the kept-block lists come straight
    from top-k (no bool map). With ``estimate_dropped`` every dropped key block enters the
    softmax as its pooled mean key and value (remainder.py), merged by log-sum-exp.

    Padding keys (``key_valid``) are masked in the attention only: selection ranks blocks by
    block means that include them, so they must sit in forced blocks (the adapters' padded
    text is a suffix of the forced text blocks, design §4.2), which are kept whatever they score.

    Args:
        q, k, v: [B, H, S, D], tokens in the order the forced blocks refer to.
        block_size, density, mass_threshold, forced: as in select_blocks.
        backend, key_valid: as in block_sparse_attention.
        estimate_dropped: estimate the dropped blocks' share instead of leaving it out: for
            every head, or per head (H flags).

    Returns:
        (out [B, H, S, D], kept): `kept` is a tensor whose mean is the share of block pairs
        computed (the bool map [B, H, Qb, Kb], or per-row shares [B, H, Qb] from the lists).
    """
    check_key_valid(key_valid, q.shape[0], device=q.device)
    estimated = estimated_heads(estimate_dropped, q.shape[1])  # [H] bool, or None
    spec = resolve_backend(backend, q.device, key_padding=key_valid is not None)
    if spec.name is Backend.FA4 and fa4.fa4_takes(q, k, v, block_size):
        check_qkv(q, k, v, block_size)
        if density is not None:
            counts, indices = select_block_lists(q, k, block_size=block_size, density=density,
                                                 forced=forced)  # [B, H, Qb], [B, H, Qb, W]
        else:
            counts, indices = lists_from_map(select_blocks(
                q, k, block_size=block_size, mass_threshold=mass_threshold, forced=forced))
        if estimated is None:
            out = fa4.fa4_attention_from_lists(q, k, v, counts, indices)  # [B, H, S, D]
            return out, counts.float() / num_blocks(q.shape[2], block_size)
        block_map = map_from_lists(counts, indices, num_blocks(q.shape[2], block_size))
        out, lse = fa4.fa4_attention_from_lists(q, k, v, counts, indices, return_lse=True)
    else:
        block_map = select_blocks(q, k, block_size=block_size, density=density,
                                  mass_threshold=mass_threshold, forced=forced)  # [B, H, Qb, Kb]
        if estimated is None:
            out = spec.fn(q, k, v, block_map, block_size=block_size, scale=None,
                          key_valid=key_valid)
            return out, block_map  # out: [B, H, S, D]
        out, lse = spec.fn(q, k, v, block_map, block_size=block_size, scale=None,
                           key_valid=key_valid, return_lse=True)  # [B, H, S, D], [B, H, S]
    merged = estimate_dropped_blocks(q, k, v, block_map, out, lse, block_size=block_size,
                                     key_valid=key_valid, heads=estimated)
    return merged, block_map


def estimated_heads(estimate_dropped: bool | Sequence[bool], heads: int) -> list[bool] | None:
    """select_and_attend's ``estimate_dropped`` as H flags; None when no head estimates."""
    if isinstance(estimate_dropped, bool):
        flags = [estimate_dropped] * heads
    else:
        flags = [bool(f) for f in estimate_dropped]
        if len(flags) != heads:
            raise ValueError(f"estimate_dropped gives {len(flags)} flags for {heads} heads")
    return flags if any(flags) else None
