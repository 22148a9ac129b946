"""Kept-block lists (per-row counts + ascending key-block indices): from top-k or from a bool map.

List-based kernels (the `fa4` backend) take, per (batch, head, query block) row, the number of
kept key blocks and their indices. `select_block_lists` builds them straight from the block-mean
scores (top-n per row with the forced regions, as `select_blocks` keeps them) without a bool map;
`lists_from_map` converts any map. Indices are ascending within each row: FlashAttention-4
masks the sequence tail only in the first block it visits, the last one listed, so a partial
last key block kept anywhere but last would let padded keys into the softmax.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import torch

from .block_map import ForcedBlocks, _check_selection, head_densities, row_budget, token_block_means
from .registry import triton_selection_applies


def lists_from_map(block_map: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(counts [B|1, H|1, Qb] int32, indices [B|1, H|1, Qb, Kb] int32) of a bool map
    [B|1, H|1, Qb, Kb]: each row's kept key blocks first, ascending, then zeros.

    Compaction by a running count instead of a sort: each kept block goes to the slot given by
    the number of kept blocks before it; dropped blocks all go to one spare column, cut off.
    """
    num_key_blocks = block_map.shape[-1]
    counts = block_map.sum(dim=-1, dtype=torch.int32)
    slots = torch.where(block_map, block_map.cumsum(dim=-1) - 1,
                        num_key_blocks)  # int64 [.., Qb, Kb]: kept block's slot, spare if dropped
    columns = torch.arange(num_key_blocks, dtype=torch.int32, device=block_map.device)
    indices = block_map.new_zeros((*block_map.shape[:-1], num_key_blocks + 1), dtype=torch.int32)
    indices.scatter_(-1, slots, columns.expand_as(slots))
    return counts, indices[..., :num_key_blocks].contiguous()


def map_from_lists(counts: torch.Tensor, indices: torch.Tensor,
                   num_key_blocks: int) -> torch.Tensor:
    """The bool map [B, H, Qb, Kb] of kept-block lists (counts [B, H, Qb], indices
    [B, H, Qb, W]; entries past a row's count are ignored): lists_from_map's inverse."""
    slots = torch.arange(indices.shape[-1], device=indices.device)
    listed = slots < counts[..., None]  # [B, H, Qb, W]
    block_map = torch.zeros((*counts.shape, num_key_blocks + 1), dtype=torch.bool,
                            device=counts.device)
    spare = torch.where(listed, indices.long(), num_key_blocks)  # unlisted slots: spare column
    block_map.scatter_(-1, spare, True)
    return block_map[..., :num_key_blocks]


def block_logits(q: torch.Tensor, k: torch.Tensor, block_size: int) -> torch.Tensor:
    """float32 [B, H, Qb, Kb] block-mean logits q̂ k̂ᵀ: the softmax scores' order in each row
    (top-n needs no softmax)."""
    q_mean = token_block_means(q, block_size)  # [B, H, nb, D] float32
    k_mean = token_block_means(k, block_size)
    return q_mean @ k_mean.transpose(-1, -2)


def select_block_lists(
    q: torch.Tensor, k: torch.Tensor, *, block_size: int = 128,
    density: float | Sequence[float], forced: ForcedBlocks | None = None,
    scores: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The blocks select_blocks(density=...) keeps, as lists, without building the bool map.

    Args:
        q, k: [B, H, S, D] (already permuted, if a tile permutation is used).
        block_size: 64 or 128.
        density: share of all block pairs to compute, forced ones included (one per head if a
            sequence), as in select_blocks.
        forced: blocks always kept; None = none, not even the diagonal.
        scores: [B, H, Qb, Kb] scores whose per-row order ranks the blocks (block_mean_scores
            or block_logits); computed from q and k when None.

    Returns:
        (counts int32 [B, H, Qb], indices int32 [B, H, Qb, W]): each row's kept key blocks
        ascending, then zeros; W = Kb when a row is forced, else the longest row.
    """
    _check_selection(q, k, block_size, density, None, forced, scores)
    if scores is None:
        scores = block_logits(q, k, block_size)  # [B, H, Qb, Kb]
    heads, nq, nk = scores.shape[1:]
    forced = forced if forced is not None else _no_forced(nq, scores.device)
    budgets = tuple(row_budget(d, nq, nk, forced.dense_rows)
                    for d in head_densities(density, heads))
    top = min(nk, max(*budgets, forced.row_pins))  # longest non-forced row
    width = nk if forced.dense_rows else top
    rows, cols = forced.rows.to(scores.device), forced.cols.to(scores.device)
    if triton_selection_applies(scores) and scores.dtype == torch.float32:  # one Triton
        from . import triton_select  # kernel; _top_n_lists is its twin

        return triton_select.top_n_lists(scores, budgets, rows, cols, forced.diagonal, width)
    return _top_n_lists(scores, budgets, forced, top, width)


def _top_n_lists(scores: torch.Tensor, budgets: tuple[int, ...], forced: ForcedBlocks, top: int,
                 width: int) -> tuple[torch.Tensor, torch.Tensor]:
    # scores [B, H, Qb, Kb] -> (counts [B, H, Qb], indices [B, H, Qb, width]), int32. Forced
    # blocks rank first (inf), so they count inside the budget and are all kept past it.
    nk = scores.shape[-1]
    ranked = scores.masked_fill(forced.pairs(scores.device), math.inf)
    if len(set(budgets)) == 1 and forced.row_pins <= budgets[0]:  # every row keeps `top`
        chosen = ranked.topk(top, dim=-1, sorted=False).indices  # [B, H, Qb, top]
        counts = torch.full(chosen.shape[:-1], top, dtype=torch.int32, device=scores.device)
    else:
        values, chosen = ranked.topk(top, dim=-1)  # best first
        keep = _rank_limits(budgets, top, scores.device)[None, :, None, :] | values.isinf()
        chosen = chosen.masked_fill(~keep, nk)  # dropped: past every real block when sorted
        counts = keep.sum(dim=-1, dtype=torch.int32)
    indices = chosen.to(torch.int32).sort(dim=-1).values  # [B, H, Qb, top] ascending
    slots = torch.arange(top, device=scores.device)
    indices = indices.masked_fill(slots >= counts[..., None], 0)
    if width == top:
        return counts, indices
    every = torch.arange(nk, dtype=torch.int32, device=scores.device)  # a forced row's list
    dense = forced.rows.to(scores.device)[:, None]  # [Qb, 1]
    indices = torch.where(dense, every, torch.nn.functional.pad(indices, (0, nk - top)))
    return torch.where(dense[:, 0], nk, counts), indices


@functools.cache
def _no_forced(num_blocks: int, device: torch.device) -> ForcedBlocks:
    empty = torch.zeros(num_blocks, dtype=torch.bool, device=device)
    return ForcedBlocks(empty, empty, diagonal=False)


@functools.cache
def _rank_limits(budgets: tuple[int, ...], top: int, device: torch.device) -> torch.Tensor:
    # bool [H, top]: rank r of head h is kept when r < budgets[h]. Built once per setting.
    ranks = torch.arange(top, device=device)
    return ranks[None, :] < torch.tensor(budgets, device=device)[:, None]
