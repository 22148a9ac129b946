"""Attention and step-change statistics as pure tensor functions, tiled over query rows.

Softmax attention A = softmax(q kᵀ · scale) is never held as an S x S matrix: rows are processed
in tiles of ``tile_rows`` queries, each tile reduced at once to (a) the block-pooled mass map,
(b) the mass every key token receives, (c) the sum of row entropies. Everything else (recall of
block masks, sink/text mass, foreground statistics) is derived from those reductions. Every
function has a ``*_reference`` twin that builds the full matrix naively (tests only).

Definitions (token counts S, block size bs, Qb = Kb = ceil(S / bs)):
- block_mass[b, h, i, j] = mean over query tokens t of block i of sum over keys s of block j of
  A[b, h, t, s]; each row sums to 1 (ProfilingDiT/RainFusion's "mass per key block").
- received[b, h, s] = mean over all query tokens t of A[b, h, t, s]: ProfilingDiT's aggregated
  score ā_s (arXiv 2504.03140, Eq. 5, the column mean); it sums to 1 over s.
- entropy[b, h] = mean over query rows of -sum_s A log A, divided by ln(S) (in [0, 1]).
With key padding (``key_valid``, int [B]) A is the model's attention: keys at positions
>= key_valid[b] get no mass (padded text, design D7); queries are all S tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ditplan.runtime.kernels.block_map import ForcedBlocks, block_mean_scores, select_blocks
from ditplan.runtime.kernels.reference import expand_block_map, key_padding_mask
from ditplan.runtime.kernels.registry import check_block_size, num_blocks

DEFAULT_TILE_BYTES = 1 << 30  # one [B, H, tile_rows, S] float32 buffer; two are alive at a time


@dataclass(frozen=True)
class AttentionSummary:
    """Reductions of one attention call (float32, or float64 for float64 inputs).

    block_mass: [B, H, Qb, Kb]; entropy: [B, H]; received: [B, H, S] (see module docstring);
    block_size: the block size block_mass was pooled with.
    """

    block_mass: torch.Tensor
    entropy: torch.Tensor
    received: torch.Tensor
    block_size: int

    @property
    def seq_len(self) -> int:
        return self.received.shape[-1]

    def query_weights(self) -> torch.Tensor:
        """Share of query tokens in each query block: [Qb], summing to 1."""
        sizes = query_block_sizes(self.seq_len, self.block_size, self.received.device)
        return sizes.to(self.block_mass.dtype) / self.seq_len


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_qk(q: torch.Tensor, k: torch.Tensor, block_size: int) -> None:
    check_block_size(block_size)
    if q.ndim != 4 or q.shape != k.shape or q.shape[2] == 0:
        raise ValueError(f"q and k must both be [B, H, S, D] with S > 0 and equal shapes; got "
                         f"{tuple(q.shape)} and {tuple(k.shape)}")


def default_tile_rows(q: torch.Tensor, block_size: int, max_bytes: int = DEFAULT_TILE_BYTES) -> int:
    """Query rows per tile: a multiple of block_size whose [B, H, rows, S] buffer fits max_bytes."""
    batch, heads, seq_len, _ = q.shape
    per_row = batch * heads * seq_len * torch.finfo(_compute_dtype(q.dtype)).bits // 8
    return max(block_size, (max_bytes // per_row) // block_size * block_size)


def _pool_keys(probs: torch.Tensor, block_size: int) -> torch.Tensor:
    # probs: [B, H, T, S] -> [B, H, T, Kb]; full blocks by a view, the partial tail separately.
    seq_len = probs.shape[-1]
    full = seq_len // block_size
    pooled = probs[..., : full * block_size].unflatten(-1, (full, block_size)).sum(-1)
    if seq_len == full * block_size:
        return pooled
    return torch.cat([pooled, probs[..., full * block_size :].sum(-1, keepdim=True)], dim=-1)


def _row_entropy_sum(probs: torch.Tensor, log_probs: torch.Tensor) -> torch.Tensor:
    # -sum_t sum_s p log p as batched dot products, without a third [B, H, T, S] buffer.
    dots = probs.unsqueeze(-2) @ log_probs.unsqueeze(-1)  # [B, H, T, 1, 1]
    return -dots.flatten(-3).sum(-1)  # [B, H]


def attention_summary(
    q: torch.Tensor, k: torch.Tensor, *, block_size: int = 128, scale: float | None = None,
    tile_rows: int | None = None, key_valid: torch.Tensor | None = None,
) -> AttentionSummary:
    """Exact softmax-attention reductions computed in tiles of query rows (memory O(tile x S)).

    Args:
        q, k: [B, H, S, D] (tokens in the order whose blocks are measured, i.e. permuted).
        block_size: 64 or 128 (the runtime's unit of sparsity).
        scale: softmax scale; 1/sqrt(D) when None.
        tile_rows: query rows per tile (rounded to a multiple of block_size); by memory if None.
        key_valid: int [B] valid keys (the rest padding, never attended), or None.

    Returns:
        AttentionSummary with block_mass [B, H, Qb, Kb], entropy [B, H], received [B, H, S].
    """
    _check_qk(q, k, block_size)
    batch, heads, seq_len, head_dim = q.shape
    dtype = _compute_dtype(q.dtype)
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    rows = tile_rows or default_tile_rows(q, block_size)
    rows = max(block_size, rows // block_size * block_size)
    nb = num_blocks(seq_len, block_size)
    k_t = k.to(dtype).transpose(-1, -2)  # [B, H, D, S]
    block_sums = q.new_zeros((batch, heads, nb, nb), dtype=dtype)
    received = q.new_zeros((batch, heads, seq_len), dtype=dtype)
    entropy = q.new_zeros((batch, heads), dtype=dtype)
    padding = None if key_valid is None else ~key_padding_mask(key_valid, seq_len)  # [B,1,1,S]
    for start in range(0, seq_len, rows):
        logits = (q[:, :, start : start + rows].to(dtype) @ k_t) * scale  # [B, H, T, S]
        if padding is not None:
            logits.masked_fill_(padding, -math.inf)
        log_probs = logits.sub_(logits.logsumexp(-1, keepdim=True))  # in place: [B, H, T, S]
        probs = log_probs.exp()  # [B, H, T, S]
        if padding is not None:
            log_probs.masked_fill_(padding, 0.0)  # p log p = 0 where p = 0 (not 0 * -inf)
        entropy += _row_entropy_sum(probs, log_probs)
        del log_probs
        received += probs.sum(-2)
        q_block = torch.arange(start, start + probs.shape[-2], device=q.device) // block_size
        block_sums.index_add_(2, q_block, _pool_keys(probs, block_size))
        del probs
    counts = query_block_sizes(seq_len, block_size, q.device).to(dtype)  # [Qb]
    return AttentionSummary(
        block_mass=block_sums / counts[:, None],
        entropy=entropy / (seq_len * _log_or_one(seq_len)),
        received=received / seq_len,
        block_size=block_size,
    )


def _log_or_one(seq_len: int) -> float:
    # ln(S) normalizes the entropy; a single key has zero entropy whatever we divide by.
    return math.log(seq_len) if seq_len > 1 else 1.0


def query_block_sizes(seq_len: int, block_size: int, device=None) -> torch.Tensor:
    """Tokens per block, int64 [ceil(S / block_size)] (the last block may be partial)."""
    starts = torch.arange(0, seq_len, block_size, device=device)
    return torch.clamp(seq_len - starts, max=block_size)


def attention_probs_reference(q: torch.Tensor, k: torch.Tensor, scale: float | None = None,
                              key_valid: torch.Tensor | None = None):
    """The full attention matrix A in float64: [B, H, S, S] (test oracle; memory S x S)."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    logits = q.double() @ k.double().transpose(-1, -2) * scale  # [B, H, S, S]
    if key_valid is not None:
        logits = logits.masked_fill(~key_padding_mask(key_valid, q.shape[2]), -math.inf)
    return torch.softmax(logits, dim=-1)


def attention_summary_reference(
    q: torch.Tensor, k: torch.Tensor, *, block_size: int = 128, scale: float | None = None,
    key_valid: torch.Tensor | None = None,
) -> AttentionSummary:
    """attention_summary from the full float64 matrix with loops over blocks (test oracle)."""
    _check_qk(q, k, block_size)
    probs = attention_probs_reference(q, k, scale, key_valid)  # [B, H, S, S]
    seq_len = q.shape[2]
    starts = range(0, seq_len, block_size)
    rows = [
        torch.stack([probs[:, :, i : i + block_size, j : j + block_size].sum(-1).mean(-1)
                     for j in starts], dim=-1)
        for i in starts
    ]
    plogp = torch.where(probs > 0, probs * probs.log(), torch.zeros_like(probs))
    return AttentionSummary(
        block_mass=torch.stack(rows, dim=-2),  # [B, H, Qb, Kb]
        entropy=-plogp.sum(-1).mean(-1) / _log_or_one(seq_len),
        received=probs.mean(-2),
        block_size=block_size,
    )


def mass_on_blocks(summary: AttentionSummary, key_blocks: torch.Tensor) -> torch.Tensor:
    """Share of all attention mass landing on the given key blocks (first-frame sink, text).

    Args:
        summary: attention_summary of the call.
        key_blocks: bool [Kb].

    Returns:
        [B, H], the mean over query tokens of the mass on those blocks, in [0, 1].
    """
    on_blocks = (summary.block_mass * key_blocks.to(summary.block_mass.device)).sum(-1)  # [B,H,Qb]
    return on_blocks @ summary.query_weights()


def mass_on_blocks_reference(
    q: torch.Tensor, k: torch.Tensor, key_blocks: torch.Tensor, *, block_size: int
) -> torch.Tensor:
    """mass_on_blocks from the full float64 matrix and an element mask (test oracle): [B, H]."""
    probs = attention_probs_reference(q, k)  # [B, H, S, S]
    columns = key_blocks.cpu().repeat_interleave(block_size)[: q.shape[2]].to(probs.device)
    return probs[..., columns].sum(-1).mean(-1)


def mask_recall(summary: AttentionSummary, block_map: torch.Tensor) -> torch.Tensor:
    """Share of attention mass a block mask keeps: bool [B|1, H|1, Qb, Kb] -> [B, H]."""
    kept = (summary.block_mass * block_map).sum(-1)  # [B, H, Qb]
    return kept @ summary.query_weights()


@dataclass(frozen=True)
class RecallCurves:
    """Per density D: mass kept by the predicted and the oracle mask, and the predicted mask's
    share of block pairs. Each [B, H, D]."""

    predicted: torch.Tensor
    oracle: torch.Tensor
    kept_fraction: torch.Tensor


def predicted_block_maps(
    q: torch.Tensor, k: torch.Tensor, *, block_size: int, densities: tuple[float, ...],
    forced: ForcedBlocks | None,
) -> list[torch.Tensor]:
    """The runtime's block maps at each density: block-mean scores, then ``select_blocks``.

    Args:
        q, k: [B, H, S, D], tokens in the runtime's (permuted) order.
        block_size: the runtime's block size.
        densities: nominal densities in (0, 1].
        forced: always-kept blocks (forced_blocks(...)), or None.

    Returns:
        one bool [B, H, Qb, Kb] per density.
    """
    scores = block_mean_scores(q, k, block_size=block_size)  # [B, H, Qb, Kb]
    return [select_blocks(q, k, block_size=block_size, density=density, forced=forced,
                          scores=scores) for density in densities]


def recall_at_densities(
    q: torch.Tensor, k: torch.Tensor, summary: AttentionSummary, *,
    densities: tuple[float, ...], forced: ForcedBlocks | None,
    predicted_maps: list[torch.Tensor] | None = None,
) -> RecallCurves:
    """Recall of block-mean-predicted vs oracle block masks at several densities.

    Both masks are built by the runtime's ``select_blocks`` (top n = max(1, ceil(d * Kb)) key
    blocks per query-block row, plus the forced sink/text/diagonal blocks): the predicted one
    ranks blocks by block-mean scores (what the runtime sees), the oracle by the true block mass.

    Args:
        q, k: [B, H, S, D], the tensors ``summary`` was computed from.
        summary: attention_summary(q, k, block_size=...).
        densities: nominal densities in (0, 1].
        forced: always-kept blocks (forced_blocks(...)), or None.
        predicted_maps: ``predicted_block_maps(q, k, ...)`` for these densities, when the
            caller has them already (they are built here otherwise).

    Returns:
        RecallCurves, each [B, H, len(densities)].
    """
    block_size = summary.block_size
    if predicted_maps is None:
        predicted_maps = predicted_block_maps(q, k, block_size=block_size, densities=densities,
                                              forced=forced)
    predicted, oracle, kept = [], [], []
    for density, pred_map in zip(densities, predicted_maps, strict=True):  # [B, H, Qb, Kb]
        true_map = select_blocks(q, k, block_size=block_size, density=density, forced=forced,
                                 scores=summary.block_mass)
        predicted.append(mask_recall(summary, pred_map))
        oracle.append(mask_recall(summary, true_map))
        kept.append(pred_map.flatten(-2).to(summary.block_mass.dtype).mean(-1))
    return RecallCurves(*(torch.stack(x, dim=-1) for x in (predicted, oracle, kept)))


def recall_at_densities_reference(
    q: torch.Tensor, k: torch.Tensor, *, block_size: int, densities: tuple[float, ...],
    forced: ForcedBlocks | None,
) -> RecallCurves:
    """recall_at_densities from the full float64 matrix and element masks (test oracle)."""
    from ditplan.runtime.kernels.block_map import select_blocks_reference

    probs = attention_probs_reference(q, k)  # [B, H, S, S]
    true_mass = attention_summary_reference(q, k, block_size=block_size).block_mass
    seq_len = q.shape[2]
    predicted, oracle, kept = [], [], []
    for density in densities:
        for scores, out in ((None, predicted), (true_mass, oracle)):
            block_map = select_blocks_reference(q, k, block_size=block_size, density=density,
                                                forced=forced, scores=scores)
            mask = expand_block_map(block_map, seq_len, seq_len, block_size)  # [B, H, S, S]
            out.append((probs * mask).sum(-1).mean(-1))
            if scores is None:
                kept.append(block_map.double().mean((-1, -2)))
    return RecallCurves(*(torch.stack(x, dim=-1) for x in (predicted, oracle, kept)))


@dataclass(frozen=True)
class ForegroundStats:
    """ProfilingDiT's foreground statistics of one attention call.

    r_attn [B, H]: share of high-attention video tokens that are foreground; fg_bg_mass_ratio
    [B, H]: mean received mass per foreground token / per background token; foreground_fraction
    (0-dim): share of video tokens that are foreground.
    """

    r_attn: torch.Tensor
    fg_bg_mass_ratio: torch.Tensor
    foreground_fraction: torch.Tensor


def foreground_stats(
    received: torch.Tensor, foreground: torch.Tensor, video: torch.Tensor, threshold: float
) -> ForegroundStats:
    """R_attn and the fg/bg mass ratio from per-key received mass (arXiv 2504.03140, Eq. 5-6).

    A video token s is high-attention if received[s] > threshold / S (threshold 1 = more than
    the uniform share). Where a statistic is undefined (no high-attention token; no foreground
    or no background token; zero background mass) it takes its chance value: r_attn =
    foreground_fraction, ratio = 1, so a degenerate call neither favours foreground nor
    background.

    Args:
        received: [B, H, S] mean mass each key token receives (AttentionSummary.received).
        foreground: bool [S] foreground tokens (in the same token order), a subset of video.
        video: bool [S] video tokens (text tokens are excluded from every statistic).
        threshold: high-attention threshold in units of the uniform share 1/S.

    Returns:
        ForegroundStats.
    """
    _check_token_masks(received.shape[-1], foreground, video)
    seq_len = received.shape[-1]
    fg, bg = foreground & video, video & ~foreground  # [S]
    dtype = received.dtype
    fg_fraction = fg.sum().to(dtype) / video.sum().clamp_min(1).to(dtype)
    high = (received > threshold / seq_len) & video  # [B, H, S]
    n_high = high.sum(-1).to(dtype)
    r_attn = torch.where(n_high > 0, (high & fg).sum(-1).to(dtype) / n_high.clamp_min(1),
                         fg_fraction)
    mean_fg = (received * fg).sum(-1) / fg.sum().clamp_min(1)
    mean_bg = (received * bg).sum(-1) / bg.sum().clamp_min(1)
    defined = fg.any() & bg.any() & (mean_bg > 0)  # [B, H], stays on device (no host sync)
    ratio = torch.where(defined, mean_fg / mean_bg.clamp_min(torch.finfo(dtype).tiny), 1.0)
    return ForegroundStats(r_attn, ratio, fg_fraction)


def _check_token_masks(seq_len: int, foreground: torch.Tensor, video: torch.Tensor) -> None:
    for name, mask in (("foreground", foreground), ("video", video)):
        if mask.dtype != torch.bool or tuple(mask.shape) != (seq_len,):
            raise ValueError(f"{name} must be a bool tensor of shape [{seq_len}] (one flag per "
                             f"key token); got {mask.dtype} {tuple(mask.shape)}")


def foreground_stats_reference(
    q: torch.Tensor, k: torch.Tensor, foreground: torch.Tensor, video: torch.Tensor,
    threshold: float,
) -> ForegroundStats:
    """foreground_stats from the full float64 matrix with Python loops (test oracle)."""
    probs = attention_probs_reference(q, k)  # [B, H, S, S]
    batch, heads, seq_len, _ = probs.shape
    fg = [bool(f and v) for f, v in zip(foreground.tolist(), video.tolist(), strict=True)]
    bg = [bool(v and not f) for f, v in zip(foreground.tolist(), video.tolist(), strict=True)]
    fraction = sum(fg) / max(1, sum(video.tolist()))
    r_attn = torch.empty(batch, heads, dtype=torch.float64)
    ratio = torch.empty(batch, heads, dtype=torch.float64)
    for b in range(batch):
        for h in range(heads):
            column_mean = probs[b, h].mean(0).tolist()  # ā_s = (1/S) sum_t A[t, s]
            high = [s for s in range(seq_len) if video[s] and column_mean[s] > threshold / seq_len]
            r_attn[b, h] = sum(fg[s] for s in high) / len(high) if high else fraction
            fg_mass = [column_mean[s] for s in range(seq_len) if fg[s]]
            bg_mass = [column_mean[s] for s in range(seq_len) if bg[s]]
            defined = fg_mass and bg_mass and sum(bg_mass) > 0
            ratio[b, h] = (sum(fg_mass) / len(fg_mass)) / (sum(bg_mass) / len(bg_mass)) \
                if defined else 1.0
    return ForegroundStats(r_attn, ratio, torch.tensor(fraction, dtype=torch.float64))


def step_change(current: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
    """Relative L1 and cosine distance of a tensor to its previous-step value, in float32.

    Args:
        current, previous: same shape, any float dtype (e.g. a block residual [B, S, C]).

    Returns:
        float32 [2]: (sum|cur - prev| / sum|prev|, 1 - cos(cur, prev)), over all elements.
        Zero denominators are clamped to the smallest normal float (no NaN, no host sync).
    """
    if current.shape != previous.shape:
        raise ValueError(f"step_change needs equal shapes; got {tuple(current.shape)} and "
                         f"{tuple(previous.shape)}")
    cur, prev = current.float().flatten(), previous.float().flatten()
    tiny = torch.finfo(torch.float32).tiny
    rel_l1 = (cur - prev).abs().sum() / prev.abs().sum().clamp_min(tiny)
    cos = (cur @ prev) / (cur.norm() * prev.norm()).clamp_min(tiny)
    return torch.stack([rel_l1, 1.0 - cos])


def step_change_reference(current: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
    """step_change in float64 with torch.nn.functional.cosine_similarity (test oracle): [2]."""
    cur, prev = current.double().flatten(), previous.double().flatten()
    rel_l1 = (cur - prev).abs().sum() / prev.abs().sum()
    cos = torch.nn.functional.cosine_similarity(cur, prev, dim=0, eps=0.0)
    return torch.stack([rel_l1, 1.0 - cos])
