"""`dense` backend: SDPA with the block map expanded to an S x S bool mask (reference use only)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .reference import expand_block_map, key_padding_mask, reference_compute_dtype
from .registry import Backend, register_backend


@register_backend(Backend.DENSE)
def dense_block_sparse_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_map: torch.Tensor,
    *, block_size: int, scale: float | None = None, key_valid: torch.Tensor | None = None,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """F.scaled_dot_product_attention with the element mask of `block_map`.

    Materializes a bool [B|1, H|1, S, S] mask (1 GiB per head at S=32,760) and skips no work:
    it is the dense baseline for tests and debugging, not a fast path. With an all-True map the
    result equals F.scaled_dot_product_attention(q, k, v) (bitwise on CPU).

    Args:
        q, k, v: [B, H, S, D].
        block_map: bool [B|1, H|1, ceil(S/bs), ceil(S/bs)], True = compute.
        block_size: 64 or 128.
        scale: softmax scale; 1/sqrt(D) when None.
        key_valid: int [B] valid keys per batch element (the rest padding), or None.
        return_lse: also return each query's log-sum-exp of kept scores (from an explicit
            [B, H, S, S] score matrix: small inputs only).

    Returns:
        [B, H, S, D] in q's dtype; with `return_lse`, (out, lse [B, H, S] float32).
    """
    seq_len = q.shape[-2]
    mask = expand_block_map(block_map, seq_len, seq_len, block_size)  # [B|1, H|1, S, S]
    if key_valid is not None:
        mask = mask & key_padding_mask(key_valid, seq_len)  # [B, H|1, S, S]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    if not return_lse:
        return out
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    dtype = reference_compute_dtype(q.dtype)
    scores = (q.to(dtype) @ k.to(dtype).transpose(-1, -2)) * scale  # [B, H, S, S]
    return out, torch.logsumexp(scores.masked_fill(~mask, -math.inf), dim=-1)
