"""Oracle for block-sparse attention: block map -> element mask, masked dense softmax attention."""

from __future__ import annotations

import math

import torch

from .registry import check_attention_inputs, num_blocks


def expand_block_map(
    block_map: torch.Tensor, seq_q: int, seq_k: int, block_size: int
) -> torch.Tensor:
    """Element mask of a block map: query i may see key j iff block (i // bs, j // bs) is kept.

    Args:
        block_map: bool [B|1, H|1, ceil(seq_q/bs), ceil(seq_k/bs)].
        seq_q, seq_k: token counts; the last block of each side may be partial.
        block_size: tokens per block (bs).

    Returns:
        bool [B|1, H|1, seq_q, seq_k]. Memory is seq_q x seq_k: reference use only.
    """
    expected = (num_blocks(seq_q, block_size), num_blocks(seq_k, block_size))
    if block_map.ndim != 4 or tuple(block_map.shape[-2:]) != expected:
        raise ValueError(f"block_map must be [B|1, H|1, {expected[0]}, {expected[1]}] for "
                         f"seq_q={seq_q}, seq_k={seq_k}, block_size={block_size}; "
                         f"got {tuple(block_map.shape)}")
    mask = block_map.repeat_interleave(block_size, dim=-2).repeat_interleave(block_size, dim=-1)
    return mask[..., :seq_q, :seq_k]  # [B|1, H|1, Sq, Sk]


def key_padding_mask(key_valid: torch.Tensor, seq_len: int) -> torch.Tensor:
    """bool [B, 1, 1, S]: True for the keys before key_valid[b] (int [B]), False for padding."""
    positions = torch.arange(seq_len, device=key_valid.device)
    return (positions[None, :] < key_valid[:, None])[:, None, None, :]


def reference_compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; everything else is computed in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def masked_attention_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_map: torch.Tensor,
    *, block_size: int, scale: float | None = None, key_valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Dense softmax attention restricted to the kept blocks: the oracle every backend must match.

    Computed in float64 for float64 inputs, else in float32. A query row with no kept key (not
    produced by select_blocks, which keeps the diagonal) gets a zero output, as SDPA and the
    sparse backends give.

    Args:
        q, k, v: [B, H, S, D].
        block_map: bool [B|1, H|1, ceil(S/bs), ceil(S/bs)], True = compute.
        block_size: 64 or 128.
        scale: softmax scale; 1/sqrt(D) when None.
        key_valid: int [B], values in [1, S]: keys at positions >= key_valid[b] are padding,
            never attended; None: every key is valid.

    Returns:
        [B, H, S, D] in the compute dtype (float64 or float32).
    """
    check_attention_inputs(q, k, v, block_map, block_size, key_valid)
    dtype = reference_compute_dtype(q.dtype)
    seq_len, head_dim = q.shape[-2], q.shape[-1]
    if key_valid is not None and not ((key_valid >= 1) & (key_valid <= seq_len)).all():
        raise ValueError(f"key_valid must lie in [1, S={seq_len}]; got {key_valid.tolist()}")
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    mask = expand_block_map(block_map, seq_len, seq_len, block_size)  # [B|1, H|1, S, S]
    if key_valid is not None:
        mask = mask & key_padding_mask(key_valid, seq_len)  # [B, H|1, S, S]
    scores = (q.to(dtype) @ k.to(dtype).transpose(-1, -2)) * scale  # [B, H, S, S]
    probs = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)
    probs = torch.nan_to_num(probs, nan=0.0)  # rows with every key dropped: 0/0 -> 0
    return probs @ v.to(dtype)  # [B, H, S, D]
