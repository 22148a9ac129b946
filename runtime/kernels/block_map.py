"""Online block-mean block selection (RainFusion2.0 / SpargeAttn): pooled scores -> bool block map.

Q and K are mean-pooled per block of consecutive tokens, blocks are scored with
softmax(q̂ k̂ᵀ · scale) per head, and each query-block row keeps its top key blocks by count
(density) or by predicted attention mass (threshold), plus forced regions (first-frame sink,
text tokens, the diagonal). A density is the share of all block pairs computed, forced ones
included: forced rows are computed in full and the other rows' budgets shrink to pay for them,
and forced columns count inside each row's budget.
RainFusion2.0: arXiv 2512.24086 (Ascend/MindIE-SD tech report);
SpargeAttn: github.com/thu-ml/SpargeAttn.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from .registry import check_block_size, num_blocks, triton_selection_applies


@dataclass(frozen=True)
class ForcedBlocks:
    """Blocks always computed: whole rows, whole columns, and optionally the diagonal.

    rows: bool [Qb], True = that query block attends to every key block.
    cols: bool [Kb], True = every query block attends to that key block.
    diagonal: keep block (i, i) in every row.
    """

    rows: torch.Tensor
    cols: torch.Tensor
    diagonal: bool = True
    dense_rows: int = field(init=False)  # number of forced rows, counted once (a host sync)
    row_pins: int = field(init=False)  # most forced blocks in one non-forced row (same sync)
    share: float = field(init=False)  # forced pairs' share of all block pairs (same sync)
    _pairs: torch.Tensor = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        for name, x in (("rows", self.rows), ("cols", self.cols)):
            if x.dtype != torch.bool or x.ndim != 1:
                raise ValueError(f"ForcedBlocks.{name} must be a 1-D bool tensor; "
                                 f"got {x.dtype} {tuple(x.shape)}")
        object.__setattr__(self, "dense_rows", int(self.rows.sum()))
        pairs = self.rows[:, None] | self.cols[None, :].to(self.rows.device)  # [Qb, Kb]
        if self.diagonal:
            pairs = pairs | torch.eye(pairs.shape[0], dtype=torch.bool, device=pairs.device)
        object.__setattr__(self, "_pairs", pairs)
        object.__setattr__(self, "share", float(pairs.double().mean()) if pairs.numel() else 0.0)
        free_rows = pairs[~self.rows.to(pairs.device)]  # [Qb - dense_rows, Kb]
        object.__setattr__(self, "row_pins", int(free_rows.sum(-1).max()) if len(free_rows) else 0)

    def pairs(self, device: torch.device | str | None = None) -> torch.Tensor:
        """bool [Qb, Kb]: every forced block pair (rows, columns and the diagonal), built once
        at construction (a layout's ForcedBlocks is reused for every call)."""
        return self._pairs if device is None else self._pairs.to(device)


def _check_token_mask(name: str, mask: torch.Tensor | None, seq_len: int) -> None:
    if mask is not None and (mask.dtype != torch.bool or tuple(mask.shape) != (seq_len,)):
        raise ValueError(f"{name} must be a bool tensor of shape [{seq_len}] (one flag per "
                         f"token, in the permuted order); got {mask.dtype} {tuple(mask.shape)}")


def forced_blocks(
    seq_len: int, block_size: int, *, sink_tokens: torch.Tensor | None = None,
    text_tokens: torch.Tensor | None = None, diagonal: bool = True,
    device: torch.device | str | None = None,
) -> ForcedBlocks:
    """Forced regions from token masks: a block holding any sink or text token is forced.

    Args:
        seq_len: S.
        block_size: 64 or 128.
        sink_tokens: bool [S] first-frame tokens in the PERMUTED order (permute the mask with
            the same index as the tokens), or None.
        text_tokens: bool [S] text tokens (joint-attention layouts), or None.
        diagonal: always keep the diagonal blocks.
        device: device of the result when both masks are None (else the masks' device).

    Returns:
        ForcedBlocks with rows == cols: bool [ceil(S / block_size)].
    """
    check_block_size(block_size)
    if seq_len < 1:
        raise ValueError(f"seq_len must be positive; got {seq_len}")
    _check_token_mask("sink_tokens", sink_tokens, seq_len)
    _check_token_mask("text_tokens", text_tokens, seq_len)
    masks = [m for m in (sink_tokens, text_tokens) if m is not None]
    nb = num_blocks(seq_len, block_size)
    if not masks:
        empty = torch.zeros(nb, dtype=torch.bool, device=device)
        return ForcedBlocks(empty, empty, diagonal)
    tokens = masks[0] if len(masks) == 1 else masks[0] | masks[1]  # [S]
    padded = torch.nn.functional.pad(tokens, (0, nb * block_size - seq_len), value=False)
    blocks = padded.reshape(nb, block_size).any(dim=-1)  # [nb]
    return ForcedBlocks(blocks, blocks, diagonal)


def block_mean_scores(
    q: torch.Tensor, k: torch.Tensor, *, block_size: int = 128, scale: float | None = None
) -> torch.Tensor:
    """Predicted block attention: softmax over key blocks of mean-pooled q̂ k̂ᵀ · scale.

    Pooling and scoring run in float32; a partial tail block is averaged over its real tokens.

    Args:
        q, k: [B, H, S, D].
        block_size: 64 or 128.
        scale: score scale; 1/sqrt(D) when None.

    Returns:
        float32 [B, H, Qb, Kb], each row summing to 1 (Qb = Kb = ceil(S / block_size)).
    """
    _check_qk(q, k, block_size)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    q_mean = token_block_means(q, block_size)  # [B, H, nb, D] float32
    k_mean = token_block_means(k, block_size)
    return torch.softmax((q_mean @ k_mean.transpose(-1, -2)) * scale, dim=-1)  # [B, H, Qb, Kb]


def token_block_means(x: torch.Tensor, block_size: int) -> torch.Tensor:
    """[B, H, S, D] -> float32 [B, H, ceil(S / block_size), D]: each block's mean token (the last
    block over its real tokens)."""
    # Full blocks and the tail summed separately so no float32 copy of x is made
    # (sum(dtype=float32) upcasts inside the reduction). On CUDA one Triton kernel does it
    # (triton_select.block_means; this is its twin).
    if triton_selection_applies(x):
        from . import triton_select

        return triton_select.block_means(x, block_size)
    batch, heads, seq_len, head_dim = x.shape
    full = seq_len // block_size
    body = x[:, :, : full * block_size].reshape(batch, heads, full, block_size, head_dim)
    means = body.sum(dim=-2, dtype=torch.float32) / block_size  # [B, H, full, D]
    tail = seq_len - full * block_size
    if tail == 0:
        return means
    tail_mean = x[:, :, full * block_size :].sum(dim=-2, keepdim=True, dtype=torch.float32) / tail
    return torch.cat([means, tail_mean], dim=-2)


def block_mean_scores_reference(
    q: torch.Tensor, k: torch.Tensor, *, block_size: int = 128, scale: float | None = None
) -> torch.Tensor:
    """block_mean_scores with a Python loop over blocks (test oracle); float32 [B, H, Qb, Kb]."""
    _check_qk(q, k, block_size)
    seq_len, head_dim = q.shape[-2], q.shape[-1]
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    starts = range(0, seq_len, block_size)
    q_mean = torch.stack([q[:, :, s : s + block_size].float().mean(-2) for s in starts], dim=-2)
    k_mean = torch.stack([k[:, :, s : s + block_size].float().mean(-2) for s in starts], dim=-2)
    return torch.softmax(q_mean @ k_mean.transpose(-1, -2) * scale, dim=-1)


def row_budget(density: float, num_query_blocks: int, num_key_blocks: int,
               dense_rows: int = 0) -> int:
    """Key blocks kept per (non-forced) query-block row so the whole map computes `density`
    of all Qb x Kb block pairs, `dense_rows` forced rows (computed in full) included.

    ceil, at least 1 and at most Kb; with no forced rows it is ceil(density * Kb). A 1e-9
    slack keeps float round-up from adding a block (`0.1 * 30` is 3.0000000000000004).
    """
    free_rows = num_query_blocks - dense_rows
    if free_rows <= 0:
        return num_key_blocks
    pairs = (density * num_query_blocks - dense_rows) * num_key_blocks
    return min(num_key_blocks, max(1, math.ceil(pairs / free_rows - 1e-9)))


def _check_qk(q: torch.Tensor, k: torch.Tensor, block_size: int) -> None:
    check_block_size(block_size)
    if q.ndim != 4 or q.shape != k.shape:
        raise ValueError(f"q and k must both be [B, H, S, D] with the same shape; got "
                         f"{tuple(q.shape)} and {tuple(k.shape)}")
    if q.shape[2] == 0:
        raise ValueError("sequence length S must be positive")


def head_densities(density: float | Sequence[float], heads: int) -> list[float]:
    """One density per head from a scalar or a per-head sequence (checked: H values in (0, 1])."""
    values = [float(density)] * heads if isinstance(density, (int, float)) else list(density)
    if len(values) != heads:
        raise ValueError(f"per-head densities give {len(values)} values for {heads} heads")
    if not all(0.0 < d <= 1.0 for d in values):
        raise ValueError(f"density must be in (0, 1]; got {density!r}")
    return values


def _check_selection(q, k, block_size, density, mass_threshold, forced, scores) -> None:
    _check_qk(q, k, block_size)
    if (density is None) == (mass_threshold is None):
        raise ValueError("pass exactly one of density= (top-n per row) or mass_threshold= "
                         f"(cumulative mass); got density={density!r}, "
                         f"mass_threshold={mass_threshold!r}")
    if density is not None:
        head_densities(density, q.shape[1])
    if mass_threshold is not None and not 0.0 < mass_threshold <= 1.0:
        raise ValueError(f"mass_threshold must be in (0, 1]; got {mass_threshold!r}")
    batch, heads, seq_len, _ = q.shape
    nb = num_blocks(seq_len, block_size)
    if scores is not None and tuple(scores.shape) != (batch, heads, nb, nb):
        raise ValueError(f"scores must be [{batch}, {heads}, {nb}, {nb}] (block_mean_scores of "
                         f"q and k); got {tuple(scores.shape)}")
    if forced is not None and (forced.rows.numel() != nb or forced.cols.numel() != nb):
        raise ValueError(f"forced blocks are for {forced.rows.numel()} x {forced.cols.numel()} "
                         f"blocks but S={seq_len}, block_size={block_size} gives {nb}; build "
                         "them with forced_blocks(S, block_size, ...)")


def _apply_forced(block_map: torch.Tensor, forced: ForcedBlocks | None) -> torch.Tensor:
    # block_map: [B, H, Qb, Kb] bool
    if forced is None:
        return block_map
    return block_map | forced.pairs(block_map.device)


def _top_mass(scores: torch.Tensor, mass_threshold: float) -> torch.Tensor:
    # Fewest top blocks whose mass reaches the threshold: keep a block while the mass of the
    # blocks ranked above it is still below the threshold (so the crossing block is kept).
    ranked, order = torch.sort(scores, dim=-1, descending=True)  # [B, H, Qb, Kb]
    mass = ranked.double().cumsum(dim=-1)  # float64: the sum of the blocks up to and incl. each
    mass_before = torch.nn.functional.pad(mass[..., :-1], (1, 0), value=0.0)
    keep = mass_before < mass_threshold  # [B, H, Qb, Kb] in rank order
    return torch.zeros_like(scores, dtype=torch.bool).scatter(-1, order, keep)


@functools.cache
def _no_forced_blocks(num_blocks: int, device: torch.device) -> ForcedBlocks:
    empty = torch.zeros(num_blocks, dtype=torch.bool, device=device)
    return ForcedBlocks(empty, empty, diagonal=False)


@functools.cache
def _rank_limits(counts: tuple[int, ...], device: torch.device) -> torch.Tensor:
    # bool [H, max(counts)]: rank r of head h is kept when r < counts[h]. Built once per setting.
    ranks = torch.arange(max(counts), device=device)
    return ranks[None, :] < torch.tensor(counts, device=device)[:, None]


def _top_n(scores: torch.Tensor, density: float | Sequence[float],
           forced: ForcedBlocks | None) -> torch.Tensor:
    # Per row the n_h best key blocks, n_h = head h's row budget; forced blocks rank first, so
    # they count inside the budget; then forced rows, columns and diagonal are added in full.
    # scores: [B, H, Qb, Kb] -> bool [B, H, Qb, Kb].
    heads, nq, nk = scores.shape[1:]
    dense_rows = 0 if forced is None else forced.dense_rows
    counts = tuple(row_budget(d, nq, nk, dense_rows) for d in head_densities(density, heads))
    if triton_selection_applies(scores) and scores.dtype == torch.float32:  # one Triton
        # kernel; the lines below are its twin (and the path for float64 scores)
        from . import triton_select

        forced = forced if forced is not None else _no_forced_blocks(nq, scores.device)
        return triton_select.top_n_map(scores, counts, forced.rows.to(scores.device),
                                       forced.cols.to(scores.device), forced.diagonal)
    if forced is not None:
        scores = scores.masked_fill(forced.pairs(scores.device), math.inf)
    if len(set(counts)) == 1:  # one budget for all heads: rank order is not needed (faster)
        top = scores.topk(counts[0], dim=-1, sorted=False).indices  # [B, H, Qb, n]
        block_map = torch.zeros_like(scores, dtype=torch.bool).scatter(-1, top, True)
    else:
        top = scores.topk(max(counts), dim=-1).indices  # [B, H, Qb, n_max], best first
        keep = _rank_limits(counts, scores.device)[None, :, None, :].expand_as(top)
        block_map = torch.zeros_like(scores, dtype=torch.bool).scatter(-1, top, keep)
    return _apply_forced(block_map, forced)


def select_blocks(
    q: torch.Tensor, k: torch.Tensor, *, block_size: int = 128,
    density: float | Sequence[float] | None = None,
    mass_threshold: float | None = None, forced: ForcedBlocks | None = None,
    scores: torch.Tensor | None = None,
) -> torch.Tensor:
    """Block map from block-mean scores: per query-block row, top-n blocks or top mass, + forced.

    Vectorized and free of host syncs (runs under torch.compile / CUDA graphs).

    Args:
        q, k: [B, H, S, D] (already permuted, if a tile permutation is used).
        block_size: 64 or 128.
        density: share of all block pairs to compute, forced ones included: each non-forced
            row keeps row_budget(...) blocks, its forced columns and diagonal first, then the
            best-scored others (topk; ties as topk gives); a sequence gives one per head.
        mass_threshold: keep the fewest top-ranked blocks whose scores sum to >= the threshold.
        forced: blocks always kept (forced_blocks(...)); None = none, not even the diagonal.
        scores: precomputed block_mean_scores(q, k, block_size=...) [B, H, Qb, Kb], to reuse.

    Returns:
        bool [B, H, Qb, Kb], True = compute. Exactly one of density / mass_threshold is given.
    """
    _check_selection(q, k, block_size, density, mass_threshold, forced, scores)
    if scores is None:
        scores = block_mean_scores(q, k, block_size=block_size)  # [B, H, Qb, Kb]
    if density is not None:
        return _top_n(scores, density, forced)  # [B, H, Qb, Kb]
    return _apply_forced(_top_mass(scores, mass_threshold), forced)  # [B, H, Qb, Kb]


def select_blocks_reference(
    q: torch.Tensor, k: torch.Tensor, *, block_size: int = 128,
    density: float | Sequence[float] | None = None,
    mass_threshold: float | None = None, forced: ForcedBlocks | None = None,
    scores: torch.Tensor | None = None,
) -> torch.Tensor:
    """select_blocks written as explicit Python loops over rows (test oracle, same signature).

    Scores come from block_mean_scores (or `scores`), so the map is compared on equal scores.
    Rows are ranked with Python's stable sort: equal only to topk/sort for distinct scores.
    """
    _check_selection(q, k, block_size, density, mass_threshold, forced, scores)
    if scores is None:
        scores = block_mean_scores(q, k, block_size=block_size)
    batch, heads, nq, nk = scores.shape
    rows = scores.cpu().tolist()  # one device->host copy (exact Python floats); then loops
    force = _forced_lists(forced, nq)
    block_map = [[[None] * nq for _ in range(heads)] for _ in range(batch)]
    per_head = head_densities(density, heads) if density is not None else [None] * heads
    dense_rows = sum(force[0])
    for b in range(batch):
        for h in range(heads):
            budget = (None if per_head[h] is None
                      else row_budget(per_head[h], nq, nk, dense_rows))
            for i in range(nq):
                pinned = [j for j in range(nk) if _is_forced(force, i, j)]
                kept = set(pinned) | set(_kept_in_row(rows[b][h][i], pinned, budget,
                                                      mass_threshold))
                block_map[b][h][i] = [j in kept for j in range(nk)]
    return torch.tensor(block_map, dtype=torch.bool, device=scores.device)  # [B, H, Qb, Kb]


def _kept_in_row(row: list[float], pinned: list[int], budget: int | None,
                 mass_threshold: float | None) -> list[int]:
    # budget: top-n with the pinned (forced) blocks first; else the threshold rule on all blocks.
    if budget is not None:
        others = sorted((j for j in range(len(row)) if j not in pinned), key=lambda j: -row[j])
        return others[: max(0, budget - len(pinned))]
    ranked = sorted(range(len(row)), key=lambda j: -row[j])
    kept, mass = [], 0.0
    for j in ranked:
        if mass >= mass_threshold:
            break
        kept.append(j)
        mass += row[j]
    return kept


def _forced_lists(forced: ForcedBlocks | None, nb: int) -> tuple[list[bool], list[bool], bool]:
    if forced is None:
        return [False] * nb, [False] * nb, False
    return forced.rows.tolist(), forced.cols.tolist(), forced.diagonal


def _is_forced(force: tuple[list[bool], list[bool], bool], i: int, j: int) -> bool:
    rows, cols, diagonal = force
    return rows[i] or cols[j] or (diagonal and i == j)
