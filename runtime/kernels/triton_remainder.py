"""Triton fast path (CUDA) of the dropped-block estimate: pooled attention and merge in one kernel.

Twin: `remainder.remainder_attention` then `remainder.merge_attention` (the PyTorch path on
every other device, and the reference of the GPU tests). Session 16 ran the pooled-token
attention as a second FlexAttention call and merged after it: 1.02 ms + 0.18 ms a layer at the
Wan2.1-1.3B shape (H200), a third of the sparse kernel's 2.97 ms for 1/128 of its work, because
every one of its 3,072 programs loaded a query tile and wrote an output for two key tiles. Here
each program loads its query tile once, attends to the Kb pooled keys of its head, and writes
the merged output straight from the sparse output and its log-sum-exp: one read of q, one of
the sparse output, one write. Import this module only where `triton` is importable.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

# Tile of one program: query rows (at most the block size, so one map row serves them), pooled
# keys per inner step, warps, software-pipelining stages. `python -m benchmarks.estimate_parts
# --sweep` times the alternatives.
DEFAULT_CONFIG = dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=2)


@triton.jit
def _estimate_merge_kernel(
    q_ptr, k_mean_ptr, v_mean_ptr, log_count_ptr, map_ptr, flags_ptr, out_ptr, lse_ptr, res_ptr,
    seq_len, heads, num_blocks, head_dim, scale,
    sq_b, sq_h, sq_s, sq_d, sk_b, sk_h, sk_n, sk_d, sc_b, sm_b, sm_h, sm_q, sm_k,
    so_b, so_h, so_s, so_d, se_b, se_h, se_s, sr_b, sr_h, sr_s, sr_d,
    BLOCK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # One program per (query tile, batch * head): the tile's attention to the pooled tokens of
    # the blocks its query block dropped (online softmax over the Kb pooled keys), merged with
    # the sparse result by log-sum-exp; heads whose flag is 0 copy the sparse result.
    bh = tl.program_id(1).to(tl.int64)
    b, h = bh // heads, bh % heads
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_D)
    row_ok, col_ok = rows < seq_len, cols < head_dim
    tile = row_ok[:, None] & col_ok[None, :]
    out_a = tl.load(out_ptr + b * so_b + h * so_h + rows[:, None] * so_s + cols[None, :] * so_d,
                    mask=tile, other=0.0).to(tl.float32)  # [M, D]
    res_ptrs = res_ptr + b * sr_b + h * sr_h + rows[:, None] * sr_s + cols[None, :] * sr_d
    if tl.load(flags_ptr + h) == 0:
        tl.store(res_ptrs, out_a.to(res_ptr.dtype.element_ty), mask=tile)
    else:
        q = tl.load(q_ptr + b * sq_b + h * sq_h + rows[:, None] * sq_s + cols[None, :] * sq_d,
                    mask=tile, other=0.0)  # [M, D]
        # the tile's rows share one query block (BLOCK_M divides BLOCK): one map row for all
        query_block = tl.minimum(tl.program_id(0).to(tl.int64) * BLOCK_M // BLOCK, num_blocks - 1)
        k_base = k_mean_ptr + b * sk_b + h * sk_h
        v_base = v_mean_ptr + b * sk_b + h * sk_h
        map_base = map_ptr + b * sm_b + h * sm_h
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        for start in range(0, num_blocks, BLOCK_N):
            n = start + tl.arange(0, BLOCK_N)
            n_ok = n < num_blocks
            pooled = n_ok[:, None] & col_ok[None, :]
            k = tl.load(k_base + n[:, None] * sk_n + cols[None, :] * sk_d, mask=pooled, other=0.0)
            v = tl.load(v_base + n[:, None] * sk_n + cols[None, :] * sk_d, mask=pooled, other=0.0)
            log_count = tl.load(log_count_ptr + b * sc_b + n, mask=n_ok, other=float("-inf"))
            kept = tl.load(map_base + query_block * sm_q + n * sm_k, mask=n_ok, other=1)  # [N]
            s = tl.dot(q, tl.trans(k)) * scale + log_count[None, :]  # [M, N] float32
            s = tl.where((kept == 0)[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # no pooled key yet: no nan
            alpha = tl.exp(m_i - m_safe)
            p = tl.exp(s - m_safe[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m_i = m_new
        has_rest = l_i > 0
        lse_rest = m_i + tl.log(tl.where(has_rest, l_i, 1.0))  # [M]
        lse_a = tl.load(lse_ptr + b * se_b + h * se_h + rows * se_s, mask=row_ok,
                        other=float("-inf"))
        # the pooled tokens' share of the union's mass (merge_attention's sigmoid)
        share = tl.where(has_rest, 1.0 / (1.0 + tl.exp(lse_a - lse_rest)), 0.0)
        out_b = acc / tl.where(has_rest, l_i, 1.0)[:, None]
        merged = out_a + share[:, None] * (out_b - out_a)
        tl.store(res_ptrs, merged.to(res_ptr.dtype.element_ty), mask=tile)


@functools.cache
def _head_flags(flags: tuple[bool, ...], device: torch.device) -> torch.Tensor:
    # int8 [H], built once per setting (a copy from the host each call syncs the stream)
    return torch.tensor(flags, dtype=torch.int8, device=device)


def _strides(x: torch.Tensor) -> list[int]:
    # broadcast (size-1) dimensions read index 0 whatever the caller's index
    return [0 if size == 1 else stride for size, stride in zip(x.shape, x.stride(), strict=True)]


@torch.library.custom_op("ditplan::estimate_and_merge", mutates_args=())
def estimate_and_merge(
    q: torch.Tensor, k_mean: torch.Tensor, v_mean: torch.Tensor, log_count: torch.Tensor,
    block_map: torch.Tensor, estimating: list[bool], out: torch.Tensor, lse: torch.Tensor,
    block_size: int, scale: float,
) -> torch.Tensor:
    """The sparse output merged with each query's attention to its dropped blocks' pooled tokens.

    Args:
        q: [B, H, S, D] float16/bfloat16 (any strides).
        k_mean, v_mean: [B, H, Kb, D] block means in q's dtype (remainder.block_means).
        log_count: float32 [B|1, 1, Kb], log of each block's valid keys (-inf: none).
        block_map: bool [B|1, H|1, Qb, Kb], True = kept (already in `out`).
        estimating: H flags, True for the heads that estimate.
        out, lse: the sparse result [B, H, S, D] and its log-sum-exp [B, H, S] (-inf: no key).
        block_size: tokens per block; scale: softmax scale.

    Returns:
        [B, H, S, D] in out's dtype: merge_attention(out, lse, *remainder_attention(...)) for
        the flagged heads, `out` for the others.
    """
    return launch(q, k_mean, v_mean, log_count, block_map, estimating, out, lse, block_size,
                  scale, DEFAULT_CONFIG)


def launch(q, k_mean, v_mean, log_count, block_map, estimating, out, lse, block_size, scale,
           config: dict) -> torch.Tensor:
    """estimate_and_merge's kernel with the tile `config` (DEFAULT_CONFIG's keys)."""
    batch, heads, seq_len, head_dim = q.shape
    num_blocks = k_mean.shape[2]
    block_m = min(config["BLOCK_M"], block_size)
    if block_size % block_m:
        raise ValueError(f"BLOCK_M={block_m} does not divide block_size={block_size}")
    k_mean, v_mean = k_mean.contiguous(), v_mean.contiguous()  # one stride set for both
    merged = torch.empty_like(out)  # out's strides: [B, H, S, D] views of [B, S, H, D] stay so
    counts = log_count[:, 0].float().contiguous()  # [B|1, Kb]
    grid = (triton.cdiv(seq_len, block_m), batch * heads)
    _estimate_merge_kernel[grid](
        q, k_mean, v_mean, counts, block_map.view(torch.uint8),
        _head_flags(tuple(estimating), q.device), out, lse, merged,
        seq_len, heads, num_blocks, head_dim, scale,
        *_strides(q), *_strides(k_mean), _strides(counts)[0], *_strides(block_map),
        *_strides(out), *_strides(lse), *merged.stride(),
        BLOCK=block_size, BLOCK_M=block_m, BLOCK_N=config["BLOCK_N"],
        BLOCK_D=max(16, triton.next_power_of_2(head_dim)), num_warps=config["num_warps"],
        num_stages=config["num_stages"],
    )
    return merged


@estimate_and_merge.register_fake
def _(q, k_mean, v_mean, log_count, block_map, estimating, out, lse, block_size, scale):
    return torch.empty_like(out)
