"""Dropped key blocks estimated from their block means, merged into sparse attention by log-sum-exp.

Block-sparse attention drops the key blocks it does not keep, and with them their share of the
softmax mass. Here each dropped block j still enters every query's softmax as one pooled token:
its mean key k_j and mean value v_j, weighted by its count n_j of valid keys, i.e. the score
scale * q . k_j + log n_j. That is exact when the block's scores are equal (attention flat
inside the block, as in the diffuse heads that lose most mass to sparsity) and, by Jensen,
underweights a block whose scores vary. It costs one [S, Kb] score matrix per head, 1/block_size
of dense attention's, and needs the sparse kernel's log-sum-exp to merge the two parts.
`estimate_dropped_blocks` is the entry: one Triton kernel on CUDA (triton_remainder.py), the
PyTorch functions below everywhere else and as its reference.
"""

from __future__ import annotations

import math

import torch

from .block_map import token_block_means
from .reference import expand_block_map, key_padding_mask
from .registry import TRITON_IMPORTABLE, num_blocks

# Scores one chunk of query blocks may hold ([B, H, chunk, bs, Kb] float32: 2**26 is 256 MiB).
MAX_CHUNK_ELEMENTS = 2**26


def key_mask(seq_len: int, key_valid: torch.Tensor | None, device: torch.device) -> torch.Tensor:
    """bool [B|1, S]: True for keys that exist (reference.key_padding_mask when given)."""
    if key_valid is None:
        return torch.ones(1, seq_len, dtype=torch.bool, device=device)
    return key_padding_mask(key_valid, seq_len)[:, 0, 0]


def block_means(k: torch.Tensor, v: torch.Tensor, block_size: int,
                key_valid: torch.Tensor | None = None):
    """Mean key and value of every key block over its valid keys, and log of their count.

    Args:
        k, v: [B, H, S, D].
        block_size: tokens per block (the last block may be partial).
        key_valid: int [B] valid keys per batch element (the rest padding), or None.

    Returns:
        (k_mean, v_mean [B, H, Kb, D] float32 (float64 for float64 inputs), log_count
        [B|1, 1, Kb] in the same dtype: -inf for a block without a valid key).
    """
    batch, heads, seq_len, head_dim = k.shape
    dtype = torch.float64 if k.dtype == torch.float64 else torch.float32
    nb = num_blocks(seq_len, block_size)
    if dtype == torch.float32:  # one reduction per tensor (Triton on CUDA), no copy of k or v
        sizes = (seq_len - block_size * torch.arange(nb, device=k.device)).clamp(max=block_size)
        if key_valid is None:
            return (token_block_means(k, block_size), token_block_means(v, block_size),
                    sizes.to(dtype).log()[None, None])
        return _padded_block_means(k, v, block_size, key_valid, sizes)
    pad = nb * block_size - seq_len
    valid = key_mask(seq_len, key_valid, k.device)  # [B|1, S]
    valid = torch.nn.functional.pad(valid, (0, pad)).reshape(-1, 1, nb, block_size, 1)
    counts = valid.sum(dim=(-2, -1)).to(dtype)  # [B|1, 1, Kb]

    def mean(x: torch.Tensor) -> torch.Tensor:
        x = torch.nn.functional.pad(x.to(dtype), (0, 0, 0, pad))
        summed = (x.reshape(batch, heads, nb, block_size, head_dim) * valid).sum(dim=-2)
        return summed / counts.clamp(min=1)[..., None]  # [B, H, Kb, D]

    return mean(k), mean(v), counts.log()


def _padded_block_means(k: torch.Tensor, v: torch.Tensor, block_size: int,
                        key_valid: torch.Tensor, sizes: torch.Tensor):
    """block_means in float32 under key padding from the unpadded block means: blocks wholly
    before key_valid[b] keep them, the block holding key_valid[b] is summed again over its valid
    keys (one block per batch element), later blocks have no key. sizes: [Kb] tokens per block."""
    batch, heads, seq_len, head_dim = k.shape
    limits = key_valid.to(k.device).clamp(max=seq_len)  # [B]
    starts = block_size * torch.arange(len(sizes), device=k.device)  # [Kb]
    counts = torch.minimum((limits[:, None] - starts).clamp(min=0), sizes)  # [B, Kb] valid keys
    edge = torch.div(limits, block_size, rounding_mode="floor").clamp(max=len(sizes) - 1)  # [B]
    positions = edge[:, None] * block_size + torch.arange(block_size, device=k.device)  # [B, bs]
    in_edge = (positions < limits[:, None])[:, None, :, None]  # [B, 1, bs, 1]
    gather_at = positions.clamp(max=seq_len - 1)[:, None, :, None].expand(
        batch, heads, block_size, head_dim)
    scatter_at = edge[:, None, None, None].expand(batch, heads, 1, head_dim)
    whole = (counts == sizes)[:, None, :, None]  # [B, 1, Kb, 1]

    def means(x: torch.Tensor) -> torch.Tensor:
        sums = token_block_means(x, block_size) * sizes[:, None]  # [B, H, Kb, D] float32
        edge_sum = (x.gather(2, gather_at).float() * in_edge).sum(dim=2, keepdim=True)
        sums = torch.where(whole, sums, 0.0).scatter(2, scatter_at, edge_sum)
        return sums / counts.clamp(min=1)[:, None, :, None]

    return means(k), means(v), counts.to(torch.float32).log()[:, None]


def remainder_attention(q: torch.Tensor, k_mean: torch.Tensor, v_mean: torch.Tensor,
                        log_count: torch.Tensor, block_map: torch.Tensor, block_size: int,
                        scale: float | None = None):
    """Attention of every query to the pooled tokens of the key blocks its block dropped.

    Args:
        q: [B, H, S, D].
        k_mean, v_mean: [B, H, Kb, D] block means (block_means).
        log_count: [B|1, 1, Kb] log of each block's valid keys (-inf: no key).
        block_map: bool [B|1, H|1, Qb, Kb], True = kept (attended exactly elsewhere).
        block_size: tokens per block.
        scale: softmax scale; 1/sqrt(D) when None.

    Returns:
        (out [B, H, S, D], lse [B, H, S]) in k_mean's dtype; a query whose block dropped no
        block with a valid key gets out 0 and lse -inf.
    """
    batch, heads, seq_len, head_dim = q.shape
    nb = k_mean.shape[2]
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    dtype = k_mean.dtype
    padded = torch.nn.functional.pad(q.to(dtype) * scale, (0, 0, 0, nb * block_size - seq_len))
    queries = padded.reshape(batch, heads, nb, block_size, head_dim)
    dropped = ~block_map.expand(batch, heads, nb, nb)  # [B, H, Qb, Kb]
    bias = log_count[:, :, None, None, :]  # [B|1, 1, 1, 1, Kb]
    chunk = max(1, MAX_CHUNK_ELEMENTS // (batch * heads * block_size * nb))
    outs, lses = [], []
    for start in range(0, nb, chunk):
        rows = slice(start, start + chunk)
        scores = torch.einsum("bhqtd,bhkd->bhqtk", queries[:, :, rows], k_mean) + bias
        scores = scores.masked_fill(~dropped[:, :, rows, None, :], -math.inf)  # [B, H, c, bs, Kb]
        lse = torch.logsumexp(scores, dim=-1)  # [B, H, c, bs]
        probs = torch.exp(scores - lse[..., None]).nan_to_num_(nan=0.0)  # all dropped -inf: 0
        outs.append(torch.einsum("bhqtk,bhkd->bhqtd", probs, v_mean))
        lses.append(lse)
    out = torch.cat(outs, dim=2).reshape(batch, heads, nb * block_size, head_dim)
    lse = torch.cat(lses, dim=2).reshape(batch, heads, nb * block_size)
    return out[:, :, :seq_len], lse[:, :, :seq_len]


def merge_attention(out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor,
                    lse_b: torch.Tensor) -> torch.Tensor:
    """Softmax attention over the union of two disjoint key sets from each set's result.

    Args:
        out_a, out_b: [B, H, S, D] attention over each key set alone (0 for an empty set).
        lse_a, lse_b: [B, H, S] their log-sum-exp of scores (-inf for an empty set).

    Returns:
        [B, H, S, D] in out_a's dtype (rows empty in both sets: 0).
    """
    # b's share of the union's mass, e^lse_b / (e^lse_a + e^lse_b); both empty: nan -> 0 (a's 0)
    dtype = torch.promote_types(torch.promote_types(lse_a.dtype, lse_b.dtype), torch.float32)
    share = torch.sigmoid(lse_b.to(dtype) - lse_a.to(dtype)).nan_to_num_(nan=0.0)  # [B, H, S]
    return torch.lerp(out_a, out_b.to(out_a.dtype), share[..., None].to(out_a.dtype))


def estimate_dropped_blocks(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_map: torch.Tensor,
    out: torch.Tensor, lse: torch.Tensor, *, block_size: int,
    key_valid: torch.Tensor | None = None, heads: list[bool] | None = None,
) -> torch.Tensor:
    """The sparse result with each dropped key block's share estimated from its block means.

    Args:
        q, k, v: [B, H, S, D]; block_map: bool [B|1, H|1, Qb, Kb], True = kept.
        out, lse: the kept blocks' attention [B, H, S, D] and log-sum-exp [B, H, S] (a sparse
            backend's return_lse).
        block_size: tokens per block; key_valid: int [B] valid keys, or None.
        heads: H flags, the heads that estimate (the others keep `out`); None: every head.

    Returns:
        [B, H, S, D] in out's dtype.
    """
    flags = tuple(heads) if heads is not None else (True,) * q.shape[1]
    if len(flags) != q.shape[1]:
        raise ValueError(f"heads gives {len(flags)} flags for {q.shape[1]} heads")
    k_mean, v_mean, log_count = block_means(k, v, block_size, key_valid)  # [B, H, Kb, D]
    scale = 1.0 / math.sqrt(q.shape[-1])
    if q.is_cuda and TRITON_IMPORTABLE and q.dtype in (torch.float16, torch.bfloat16):
        from . import triton_remainder

        return triton_remainder.estimate_and_merge(
            q, k_mean.to(q.dtype), v_mean.to(q.dtype), log_count, block_map, list(flags), out,
            lse, block_size, scale)
    rest, rest_lse = remainder_attention(q, k_mean, v_mean, log_count, block_map, block_size,
                                         scale)  # [B, H, S, D], [B, H, S]
    for head, estimates in enumerate(flags):  # heads without it keep their sparse result
        if not estimates:  # (a fill per head: a flag tensor from the host would sync the stream)
            rest_lse[:, head] = -math.inf
    return merge_attention(out, lse, rest, rest_lse)


def estimated_attention_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_map: torch.Tensor,
    *, block_size: int, scale: float | None = None, key_valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """The oracle: one softmax over the kept keys and each dropped block's pooled token.

    Written directly (each dropped block's keys replaced by copies of its mean key and value,
    whose n_j equal scores give the log n_j weight), S x S memory: tests only.

    Args:
        q, k, v: [B, H, S, D]; block_map: bool [B|1, H|1, Qb, Kb]; as block_sparse_attention.

    Returns:
        [B, H, S, D] in float64 for float64 inputs, else float32.
    """
    seq_len, head_dim = q.shape[-2:]
    dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    k_mean, v_mean, _ = block_means(k, v, block_size, key_valid)  # [B, H, Kb, D]
    block_of = torch.arange(seq_len, device=q.device) // block_size  # [S]
    kept = expand_block_map(block_map, seq_len, seq_len, block_size)  # [B|1, H|1, S, S]
    valid = key_mask(seq_len, key_valid, q.device)[:, None, None, :]  # [B|1, 1, 1, S]
    exact = (q.to(dtype) @ k.to(dtype).transpose(-1, -2)) * scale  # [B, H, S, S]
    pooled = (q.to(dtype) @ k_mean[:, :, block_of].transpose(-1, -2)) * scale  # [B, H, S, S]
    scores = torch.where(kept, exact, pooled).masked_fill(~valid, -math.inf)
    values = torch.where(kept[..., None], v.to(dtype)[:, :, None, :, :],
                         v_mean[:, :, block_of][:, :, None, :, :])  # [B, H, S, S, D]
    probs = torch.softmax(scores, dim=-1).nan_to_num(nan=0.0)
    return (probs[..., None] * values).sum(dim=-2)
