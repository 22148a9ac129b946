"""Triton fast paths (CUDA, eager) for block selection: block means, top-n rows, kept-block lists.

Each kernel has a PyTorch twin that stays the reference and the path everywhere else (CPU,
other accelerators, under torch.compile): `block_map.token_block_means`, `block_map._top_n` with the
forced regions, `flex._kv_lists` (BlockMask lists with the partial-tail split), and
`block_lists._top_n_lists` (the top-n rows as sorted lists for the fa4 backend). The
torch versions launch 5-15 small kernels each; at the Wan2.1-1.3B shape (12 heads, 256 blocks)
they cost about 0.23 ms per layer on an H100, 7% of the sparse kernel (BENCHMARKS.md).
Import this module only where `triton` is importable (registry.TRITON_IMPORTABLE).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl


@triton.jit
def _block_means_kernel(x_ptr, out_ptr, seq_len, heads, num_blocks, head_dim,
                        stride_b, stride_h, stride_s, stride_d,
                        BLOCK: tl.constexpr, BLOCK_D: tl.constexpr):
    # One program per (batch * head, block): float32 mean of the block's real tokens.
    bh, blk = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64)
    rows = blk * BLOCK + tl.arange(0, BLOCK)
    cols = tl.arange(0, BLOCK_D)
    base = x_ptr + (bh // heads) * stride_b + (bh % heads) * stride_h
    mask = (rows[:, None] < seq_len) & (cols[None, :] < head_dim)
    x = tl.load(base + rows[:, None] * stride_s + cols[None, :] * stride_d, mask=mask, other=0.0)
    count = tl.minimum(seq_len - blk * BLOCK, BLOCK).to(tl.float32)
    means = tl.sum(x.to(tl.float32), axis=0) / count
    tl.store(out_ptr + (bh * num_blocks + blk) * head_dim + cols, means, mask=cols < head_dim)


def block_means(x: torch.Tensor, block_size: int) -> torch.Tensor:
    """[B, H, S, D] (any strides) -> float32 [B, H, ceil(S / block_size), D] block means."""
    batch, heads, seq_len, head_dim = x.shape
    num_blocks = triton.cdiv(seq_len, block_size)
    out = torch.empty(batch, heads, num_blocks, head_dim, dtype=torch.float32, device=x.device)
    _block_means_kernel[(batch * heads, num_blocks)](
        x, out, seq_len, heads, num_blocks, head_dim, *x.stride(),
        BLOCK=block_size, BLOCK_D=triton.next_power_of_2(head_dim), num_warps=4,
    )
    return out


@triton.jit
def _row_keep(scores_ptr, budgets_ptr, rows_ptr, cols_ptr, row, heads, num_blocks,
              DIAGONAL: tl.constexpr, NB: tl.constexpr):
    # Kept key blocks of one (batch, head, query block) row: its forced blocks, then the best
    # scored others up to the head's budget; a forced row keeps everything. -> (j, kept) [NB].
    i = row % num_blocks
    head = (row // num_blocks) % heads
    j = tl.arange(0, NB)
    valid = j < num_blocks
    scores = tl.load(scores_ptr + row * num_blocks + j, mask=valid, other=0.0)
    forced = tl.load(cols_ptr + j, mask=valid, other=0) != 0
    if DIAGONAL:
        forced = forced | (j == i)
    # Order-preserving integer key of the float32 score, forced blocks on top; the low 32 bits
    # break ties toward the lower block index, so exactly `budget` keys reach the threshold.
    bits = scores.to(tl.int32, bitcast=True)
    key = tl.where(forced, 0x7FFFFFFF, bits ^ ((bits >> 31) & 0x7FFFFFFF))
    key = tl.where(valid, key, -0x7FFFFFFF - 1)
    ranked_key = (key.to(tl.int64) << 32) | (NB - 1 - j).to(tl.int64)
    ranked = tl.sort(ranked_key, descending=True)
    budget = tl.load(budgets_ptr + head)
    threshold = tl.sum(tl.where(j == budget - 1, ranked, 0))
    keep = (ranked_key >= threshold) | forced | (tl.load(rows_ptr + i) != 0)
    return j, keep & valid


@triton.jit
def _top_n_rows_kernel(scores_ptr, budgets_ptr, rows_ptr, cols_ptr, map_ptr, heads, num_blocks,
                       DIAGONAL: tl.constexpr, NB: tl.constexpr):
    # One program per (batch, head, query block) row: its kept blocks as a bool map row.
    row = tl.program_id(0).to(tl.int64)
    j, keep = _row_keep(scores_ptr, budgets_ptr, rows_ptr, cols_ptr, row, heads, num_blocks,
                        DIAGONAL, NB)
    tl.store(map_ptr + row * num_blocks + j, keep.to(tl.int8), mask=j < num_blocks)


@triton.jit
def _top_n_lists_kernel(scores_ptr, budgets_ptr, rows_ptr, cols_ptr, counts_ptr, indices_ptr,
                        heads, num_blocks, width, DIAGONAL: tl.constexpr, NB: tl.constexpr):
    # One program per row: its kept blocks as a count and an ascending index list (compaction
    # by running count, so no sort), zeros after the count up to `width`.
    row = tl.program_id(0).to(tl.int64)
    j, keep = _row_keep(scores_ptr, budgets_ptr, rows_ptr, cols_ptr, row, heads, num_blocks,
                        DIAGONAL, NB)
    kept_int = keep.to(tl.int32)
    count = tl.sum(kept_int)
    slot = tl.cumsum(kept_int, axis=0) - 1
    base = row * width
    tl.store(indices_ptr + base + slot, j, mask=keep)
    tl.store(indices_ptr + base + j, tl.zeros([NB], dtype=tl.int32),
             mask=(j >= count) & (j < width))
    tl.store(counts_ptr + row, count)


@functools.cache
def _budgets(counts: tuple[int, ...], device: torch.device) -> torch.Tensor:
    return torch.tensor(counts, dtype=torch.int32, device=device)  # [H], built once per setting


def top_n_map(scores: torch.Tensor, counts: tuple[int, ...], rows: torch.Tensor,
              cols: torch.Tensor, diagonal: bool) -> torch.Tensor:
    """Bool map keeping, per row, the forced blocks first and then the best scored blocks up to
    counts[h] in all (ties toward the lower index); forced rows and forced blocks in full.

    Args:
        scores: float32 [B, H, Qb, Kb] (any order-preserving score: logits or softmax).
        counts: per-head row budgets (block_map.row_budget), H values.
        rows, cols: bool [Qb] / [Kb] forced rows and columns.
        diagonal: force block (i, i).

    Returns:
        bool [B, H, Qb, Kb].
    """
    batch, heads, num_q, num_k = scores.shape
    scores = scores.contiguous()
    out = torch.empty(scores.shape, dtype=torch.int8, device=scores.device)
    _top_n_rows_kernel[(batch * heads * num_q,)](
        scores, _budgets(counts, scores.device), rows, cols, out, heads, num_k,
        DIAGONAL=diagonal, NB=triton.next_power_of_2(num_k), num_warps=4,
    )
    return out.view(torch.bool)


def top_n_lists(scores: torch.Tensor, counts: tuple[int, ...], rows: torch.Tensor,
                cols: torch.Tensor, diagonal: bool, width: int):
    """The blocks top_n_map keeps, as lists: (counts int32 [B, H, Qb], indices int32
    [B, H, Qb, width], each row's kept blocks ascending, then zeros); `width` must be at least
    the longest row (Kb when a row is forced)."""
    batch, heads, num_q, num_k = scores.shape
    scores = scores.contiguous()
    kept = torch.empty((batch, heads, num_q), dtype=torch.int32, device=scores.device)
    indices = torch.empty((batch, heads, num_q, width), dtype=torch.int32, device=scores.device)
    _top_n_lists_kernel[(batch * heads * num_q,)](
        scores, _budgets(counts, scores.device), rows, cols, kept, indices, heads, num_k, width,
        DIAGONAL=diagonal, NB=triton.next_power_of_2(num_k), num_warps=4,
    )
    return kept, indices


@triton.jit
def _kv_lists_kernel(map_ptr, full_counts_ptr, full_indices_ptr, partial_counts_ptr,
                     partial_indices_ptr, num_blocks, TAIL: tl.constexpr, NB: tl.constexpr):
    # One program per map row: its kept key blocks ascending, then zeros; with a partial last
    # key block (TAIL) that block is listed apart as the row's only partial block.
    row = tl.program_id(0).to(tl.int64)
    j = tl.arange(0, NB)
    valid = j < num_blocks
    kept = tl.load(map_ptr + row * num_blocks + j, mask=valid, other=0) != 0
    partial = tl.zeros([NB], dtype=tl.int32)
    if TAIL:
        last = j == num_blocks - 1
        partial = (kept & last).to(tl.int32)
        kept = kept & (j != num_blocks - 1)
    kept_int = kept.to(tl.int32)
    count = tl.sum(kept_int)
    slot = tl.cumsum(kept_int, axis=0) - 1
    base = row * num_blocks
    tl.store(full_indices_ptr + base + slot, j, mask=kept)
    tl.store(full_indices_ptr + base + j, tl.zeros([NB], dtype=tl.int32),
             mask=valid & (j >= count))
    tl.store(full_counts_ptr + row, count)
    tl.store(partial_counts_ptr + row, tl.sum(partial))
    tl.store(partial_indices_ptr + base + j, tl.full([NB], 0, tl.int32) + (num_blocks - 1),
             mask=valid)


def kv_lists(block_map: torch.Tensor, tail: bool):
    """BlockMask lists of a bool map [B|1, H|1, Qb, Kb], all int32:
    (partial counts [.., Qb], partial indices [.., Qb, Kb], full counts, full indices).

    Full lists hold each row's kept blocks ascending, then zeros; with `tail` the last key
    block is left out of them and is each row's partial block when kept (indices all Kb - 1).
    """
    block_map = block_map.contiguous()
    *lead, num_q, num_k = block_map.shape
    full_counts = torch.empty((*lead, num_q), dtype=torch.int32, device=block_map.device)
    partial_counts = torch.empty_like(full_counts)
    full_indices = torch.empty(block_map.shape, dtype=torch.int32, device=block_map.device)
    partial_indices = torch.empty_like(full_indices)
    _kv_lists_kernel[(full_counts.numel(),)](
        block_map.view(torch.int8), full_counts, full_indices, partial_counts, partial_indices,
        num_k, TAIL=tail, NB=triton.next_power_of_2(num_k), num_warps=4,
    )
    return partial_counts, partial_indices, full_counts, full_indices
