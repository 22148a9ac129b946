"""`torch` backend: block-sparse attention in plain PyTorch (any device), never S x S in memory."""

from __future__ import annotations

import math

import torch

from .registry import Backend, register_backend

# Elements (gathered keys and values + scores and weights) one chunk of query blocks may hold:
# 2**25 elements is 128 MiB in float32, ~10 query blocks of 52 kept blocks each (D=128).
DEFAULT_MAX_CHUNK_ELEMENTS = 2**25


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _to_blocks(x: torch.Tensor, block_size: int) -> torch.Tensor:
    # x: [B, H, S, D] -> [B*H*nb, bs, D], zero-padded to nb*bs tokens
    batch, heads, seq_len, head_dim = x.shape
    nb = math.ceil(seq_len / block_size)
    x = torch.nn.functional.pad(x, (0, 0, 0, nb * block_size - seq_len))
    return x.reshape(batch * heads * nb, block_size, head_dim)


def _attend_rows(qb, kb, vb, rows, kv_order, counts, key_ok, width, scale, dtype):
    # rows: [c] query-block rows (flat over B, H, Qb), each keeping >= 1 key block;
    # kv_order: [N, Kb] kept blocks first; key_ok: [B|1, Kb, bs] False for tokens past S and
    # for padding keys.
    batches, nb, block_size = key_ok.shape
    per_batch = len(kb) // batches  # rows per element of key_ok's batch: H * Qb (or all)
    head_row = torch.div(rows, nb, rounding_mode="floor") * nb  # [c] first block of the row's head
    batch = torch.div(rows, per_batch, rounding_mode="floor")  # [c] the row's batch element
    blocks = kv_order[rows, :width]  # [c, W] kept key blocks (padded with dropped ones)
    slot_kept = torch.arange(width, device=rows.device) < counts[rows, None]  # [c, W]
    keep = slot_kept[..., None] & key_ok[batch[:, None], blocks]  # [c, W, bs]: kept and valid
    bias = torch.zeros(keep.shape, dtype=dtype, device=rows.device).masked_fill_(~keep, -math.inf)
    flat = (head_row[:, None] + blocks).reshape(-1)  # [c*W] rows of kb/vb
    keys = kb.index_select(0, flat).reshape(len(rows), width * block_size, -1).to(dtype)
    values = vb.index_select(0, flat).reshape(len(rows), width * block_size, -1).to(dtype)
    queries = qb.index_select(0, rows).to(dtype) * scale  # [c, bs, D]; keys: [c, W*bs, D]
    scores = (queries @ keys.transpose(1, 2)).add_(bias.reshape(len(rows), 1, -1))  # [c, bs, W*bs]
    lse = torch.logsumexp(scores, dim=-1, keepdim=True)  # [c, bs, 1], -inf without a valid key
    # A row keeping only padding keys has no valid key: -inf - -inf = nan -> 0, as a row keeping
    # no block.
    out = scores.sub_(lse).exp_().nan_to_num_(nan=0.0) @ values  # [c, bs, D]
    return out, lse[..., 0]


@register_backend(Backend.TORCH)
def torch_block_sparse_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_map: torch.Tensor,
    *, block_size: int, scale: float | None = None, key_valid: torch.Tensor | None = None,
    max_chunk_elements: int = DEFAULT_MAX_CHUNK_ELEMENTS, return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Block-sparse attention that gathers only the kept key/value blocks of each query block.

    Query-block rows (over B, H, Qb) are sorted by how many key blocks they keep and processed in
    chunks; a chunk gathers each row's kept blocks, padded to the chunk's widest row with masked
    dummies, so dense rows (sinks, text) don't widen the sparse ones. Keys past S in the tail
    block are masked, and with `key_valid` every key at a position >= key_valid[b]. Softmax
    runs in float32 (float64 for float64 inputs). One host sync per call (the sorted row
    widths), none per block.

    Args:
        q, k, v: [B, H, S, D].
        block_map: bool [B|1, H|1, ceil(S/bs), ceil(S/bs)], True = compute.
        block_size: tokens per block (bs).
        scale: softmax scale; 1/sqrt(D) when None.
        key_valid: int [B] valid keys per batch element (the rest padding), or None.
        max_chunk_elements: bound on scores + gathered keys/values held at once (elements).
        return_lse: also return the log-sum-exp of each query's kept scores.

    Returns:
        [B, H, S, D] in q's dtype; query rows with no kept key are 0. With `return_lse`,
        (out, lse [B, H, S] in the compute dtype, -inf for rows with no kept key).
    """
    batch, heads, seq_len, head_dim = q.shape
    nb = math.ceil(seq_len / block_size)
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    dtype = _compute_dtype(q.dtype)
    kept = block_map.expand(batch, heads, nb, nb).reshape(-1, nb)  # [N, Kb], N = B*H*Qb
    counts = kept.sum(dim=-1)  # [N]
    kv_order = torch.argsort(kept.to(torch.int8), dim=-1, descending=True, stable=True)  # [N, Kb]
    row_order = torch.argsort(counts, descending=True, stable=True)  # [N] widest rows first
    widths = counts[row_order].tolist()  # the one host sync
    positions = torch.arange(nb * block_size, device=q.device)
    limits = (torch.tensor([seq_len], device=q.device) if key_valid is None
              else key_valid.clamp(max=seq_len))  # [B|1] valid keys
    key_ok = (positions < limits[:, None]).reshape(-1, nb, block_size)  # [B|1, Kb, bs]
    qb, kb, vb = (_to_blocks(x, block_size) for x in (q, k, v))  # [N, bs, D] each
    out = torch.zeros(qb.shape, dtype=dtype, device=q.device)  # [N, bs, D]
    lse = torch.full(qb.shape[:2], -math.inf, dtype=dtype, device=q.device)  # [N, bs]
    per_row = block_size * (2 * head_dim + 2 * block_size)  # elements per kept block per row
    start, nonempty = 0, sum(w > 0 for w in widths)  # rows keeping no block stay 0
    while start < nonempty:
        width = widths[start]
        stop = min(nonempty, start + max(1, max_chunk_elements // (width * per_row)))
        rows = row_order[start:stop]
        out[rows], lse[rows] = _attend_rows(qb, kb, vb, rows, kv_order, counts, key_ok, width,
                                            scale, dtype)
        start = stop
    out = out.reshape(batch, heads, nb * block_size, head_dim)[:, :, :seq_len].to(q.dtype)
    if return_lse:
        return out, lse.reshape(batch, heads, nb * block_size)[:, :, :seq_len]
    return out  # [B, H, S, D]
