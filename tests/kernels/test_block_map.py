"""Block-mean selection: fast == loop reference exactly, forced regions, pooling, validation.

Exactness note: top-k and mass ranking agree between topk/sort and Python's sorted only when a
row has no tied scores. Scores here are softmax outputs of random fp32 q/k, where ties have
probability ~0 (a tie needs two 24-bit mantissas to collide), so torch.equal is the right check.
"""

from __future__ import annotations

import math

import pytest
import torch

from ditplan.runtime.kernels import (
    ForcedBlocks,
    block_mean_scores,
    forced_blocks,
    select_blocks,
    select_blocks_reference,
)
from ditplan.runtime.kernels.block_map import block_mean_scores_reference, row_budget
from ditplan.runtime.kernels.permute import first_frame_mask, tile_permutation


def _qk(batch=2, heads=3, seq=300, dim=16, dtype=torch.float32):
    return torch.randn(batch, heads, seq, dim, dtype=dtype), torch.randn(batch, heads, seq, dim,
                                                                         dtype=dtype)


def _forced(kind: str, seq: int, block_size: int) -> ForcedBlocks | None:
    if kind == "none":
        return None
    sink = torch.arange(seq) < seq // 5  # first "frame": the leading fifth of the tokens
    text = torch.arange(seq) >= seq - 20 if kind == "sink+text" else None
    return forced_blocks(seq, block_size, sink_tokens=sink, text_tokens=text)


@pytest.mark.parametrize("forced_kind", ["none", "sink", "sink+text"])
@pytest.mark.parametrize("rule", [("density", 0.05), ("density", 0.2), ("density", 0.5),
                                  ("mass_threshold", 0.1), ("mass_threshold", 0.5),
                                  ("mass_threshold", 0.9), ("mass_threshold", 1.0)])
@pytest.mark.parametrize("seq,block_size", [(300, 64), (512, 64), (700, 128), (1000, 128)])
def test_select_matches_reference(seq, block_size, rule, forced_kind):
    q, k = _qk(seq=seq)
    kwargs = {rule[0]: rule[1], "block_size": block_size,
              "forced": _forced(forced_kind, seq, block_size)}
    fast = select_blocks(q, k, **kwargs)
    ref = select_blocks_reference(q, k, **kwargs)
    nb = math.ceil(seq / block_size)
    assert fast.shape == (2, 3, nb, nb) and fast.dtype == torch.bool
    assert torch.equal(fast, ref)


@pytest.mark.parametrize("density", [0.1, 0.3, 0.5])
def test_density_keeps_top_n_per_row(density):
    q, k = _qk(seq=640)
    block_map = select_blocks(q, k, block_size=64, density=density)
    n = row_budget(density, 10, 10)
    assert (block_map.sum(-1) == n).all()
    scores = block_mean_scores(q, k, block_size=64)
    kept_min = scores.masked_fill(~block_map, 2.0).amin(-1)
    dropped_max = scores.masked_fill(block_map, -1.0).amax(-1)
    assert (kept_min > dropped_max).all()  # kept blocks outrank every dropped one


@pytest.mark.parametrize("forced_kind", ["none", "sink"])
def test_per_head_densities_match_reference_and_keep_their_own_count(forced_kind):
    q, k = _qk(seq=700)  # 3 heads, 11 blocks of 64
    densities = (0.1, 0.5, 0.3)
    kwargs = dict(block_size=64, density=densities, forced=_forced(forced_kind, 700, 64))
    fast = select_blocks(q, k, **kwargs)
    assert torch.equal(fast, select_blocks_reference(q, k, **kwargs))
    if forced_kind == "none":
        for head, density in enumerate(densities):
            assert (fast[:, head].sum(-1) == row_budget(density, 11, 11)).all()


def test_per_head_densities_must_match_the_head_count():
    q, k = _qk(seq=300)
    with pytest.raises(ValueError, match="2 values for 3 heads"):
        select_blocks(q, k, block_size=64, density=(0.2, 0.3))
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        select_blocks(q, k, block_size=64, density=(0.2, 0.3, 1.5))


def test_density_one_keeps_everything():
    q, k = _qk(seq=333)
    assert select_blocks(q, k, block_size=64, density=1.0).all()


@pytest.mark.parametrize("threshold", [0.3, 0.8])
def test_mass_threshold_keeps_fewest_blocks(threshold):
    q, k = _qk(seq=640)
    scores = block_mean_scores(q, k, block_size=64)
    block_map = select_blocks(q, k, block_size=64, mass_threshold=threshold, scores=scores)
    kept_mass = (scores * block_map).sum(-1)
    smallest_kept = scores.masked_fill(~block_map, 2.0).amin(-1)
    assert (kept_mass >= threshold - 1e-6).all()  # fp32 sums: 1e-6 slack on a mass <= 1
    assert (kept_mass - smallest_kept < threshold).all()  # one block fewer would not reach it


def test_row_budget_rounding_and_forced_rows():
    assert row_budget(0.1, 30, 30) == 3  # 0.1 * 30 = 3.0000000000000004 in floating point
    assert row_budget(0.11, 30, 30) == 4
    assert row_budget(0.001, 30, 30) == 1
    assert row_budget(1.0, 30, 30) == 30
    # 256 x 256 blocks at 0.2 with 13 dense rows (Wan 480p's first frame): the other 243 rows
    # pay for 13 * 256 pairs: ceil((0.2 * 256 - 13) * 256 / 243) = ceil(40.25) = 41
    assert row_budget(0.2, 256, 256, dense_rows=13) == 41
    assert row_budget(0.02, 256, 256, dense_rows=13) == 1  # the forced rows alone exceed it
    assert row_budget(0.5, 4, 8, dense_rows=4) == 8


@pytest.mark.parametrize("density", [0.1, 0.25, 0.5])
def test_density_counts_forced_blocks_inside_the_budget(density):
    q, k = _qk(seq=20 * 64)  # 20 blocks of 64
    forced = _forced("sink", 20 * 64, 64)  # blocks 0..3 hold the sink: dense rows and columns
    block_map = select_blocks(q, k, block_size=64, density=density, forced=forced)
    budget = row_budget(density, 20, 20, dense_rows=4)
    free_rows = block_map[:, :, 4:]  # [B, H, 16, 20]
    # forced columns and the diagonal are kept, and count inside the budget when they fit it
    assert free_rows[..., :4].all()
    assert (free_rows.sum(-1) == max(budget, 5)).all()
    assert block_map[:, :, :4].all()
    computed = block_map.float().mean().item()
    # at most one block per free row above the density (the budget is a ceil), unless the
    # forced 4 columns + diagonal alone exceed the budget (density 0.1 -> budget 1)
    assert computed <= density + 16 / 400 + 1e-6 or budget < 5


def test_forced_regions_are_rows_columns_and_diagonal():
    q, k = _qk(batch=1, heads=2, seq=6 * 64)
    rows = torch.tensor([False, True, False, False, False, False])
    cols = torch.tensor([False, False, False, True, False, False])
    # density 1/6 with one dense row: the other five rows keep ceil((1 - 1) * 6 / 5) -> 1
    # block, and the forced column (and diagonal) fill that budget, so nothing else is chosen
    forced = select_blocks(q, k, block_size=64, density=1 / 6,
                           forced=ForcedBlocks(rows, cols, diagonal=True))
    expected = rows[:, None] | cols[None, :] | torch.eye(6, dtype=torch.bool)
    assert torch.equal(forced, expected.expand_as(forced))
    no_diag = select_blocks(q, k, block_size=64, density=1 / 6,
                            forced=ForcedBlocks(rows, cols, diagonal=False))
    assert torch.equal(no_diag, (rows[:, None] | cols[None, :]).expand_as(no_diag))
    # a larger budget adds the best-scored free blocks on top of the forced ones
    roomy = select_blocks(q, k, block_size=64, density=0.5,
                          forced=ForcedBlocks(rows, cols, diagonal=True))
    assert torch.equal(roomy & expected, expected.expand_as(roomy))
    assert (roomy[:, :, [0, 2, 3, 4, 5]].sum(-1) == row_budget(0.5, 6, 6, dense_rows=1)).all()


def test_forced_blocks_from_token_masks():
    seq = 300  # blocks of 64: [0, 64), ..., [256, 300)
    sink = torch.arange(seq) < 70  # tokens 0..69: blocks 0 and 1
    text = torch.arange(seq) >= 290  # tokens 290..299: the partial tail block 4
    forced = forced_blocks(seq, 64, sink_tokens=sink, text_tokens=text)
    expected = torch.tensor([True, True, False, False, True])
    assert torch.equal(forced.rows, expected) and torch.equal(forced.cols, expected)
    assert forced.diagonal
    scattered = torch.zeros(seq, dtype=torch.bool)
    scattered[[5, 200]] = True  # one sink token anywhere forces its block
    assert forced_blocks(seq, 64, sink_tokens=scattered).rows.tolist() == [
        True, False, False, True, False]
    assert not forced_blocks(seq, 128).rows.any()


@pytest.mark.parametrize("tile, sink_blocks", [((1, 8, 8), 8), ((8, 4, 4), 64)])
def test_forced_share_of_a_first_frame_sink_grows_with_the_tile_depth(tile, sink_blocks):
    # 32 x 32 x 32 tokens, blocks of 128: 256 blocks. The first frame's 1,024 tokens fill 8
    # one-frame tiles, or lie 16 to a tile in all 64 tiles of the first 8-frame tile-frame.
    grid, nb = (32, 32, 32), 256
    sink = first_frame_mask(grid)[tile_permutation(grid, tile)]
    forced = forced_blocks(sink.numel(), 128, sink_tokens=sink)
    assert forced.dense_rows == sink_blocks
    free = nb - sink_blocks
    # forced rows and columns, then the free rows' diagonal
    expected = (1 - (free / nb) ** 2) + free / nb**2
    assert forced.share == pytest.approx(expected, abs=1e-12)
    assert forced.share == pytest.approx(forced.pairs().float().mean().item(), abs=1e-12)


@pytest.mark.parametrize("seq,block_size", [(300, 64), (128, 128), (70, 64), (1000, 128)])
def test_block_mean_scores(seq, block_size):
    q, k = _qk(seq=seq, dtype=torch.bfloat16)
    scores = block_mean_scores(q, k, block_size=block_size)
    nb = math.ceil(seq / block_size)
    assert scores.shape == (2, 3, nb, nb) and scores.dtype == torch.float32
    # fp32 pooling vs a loop of fp32 means: same math, different summation order (~1e-7 rel.)
    torch.testing.assert_close(scores, block_mean_scores_reference(q, k, block_size=block_size),
                               rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(scores.sum(-1), torch.ones(2, 3, nb), rtol=0, atol=1e-5)


def test_tail_block_is_averaged_over_real_tokens():
    q, k = _qk(batch=1, heads=1, seq=70, dim=4)
    q_hat = torch.stack([q[0, 0, :64].mean(0), q[0, 0, 64:].mean(0)])  # tail: 6 real tokens
    k_hat = torch.stack([k[0, 0, :64].mean(0), k[0, 0, 64:].mean(0)])
    expected = torch.softmax(q_hat @ k_hat.T * 0.5, dim=-1)  # scale 1/sqrt(4)
    torch.testing.assert_close(block_mean_scores(q, k, block_size=64)[0, 0], expected)
    torch.testing.assert_close(block_mean_scores(q, k, block_size=64, scale=0.1)[0, 0],
                               torch.softmax(q_hat @ k_hat.T * 0.1, dim=-1))


def test_float64_scores_matches_reference():
    # The profiler passes exact float64 block masses as `scores`.
    q, k = (torch.randn(1, 2, 300, 16) for _ in range(2))
    scores = torch.softmax(torch.randn(1, 2, 5, 5, dtype=torch.float64), dim=-1)
    for rule in ({"density": 0.4}, {"mass_threshold": 0.7}):
        fast = select_blocks(q, k, block_size=64, scores=scores, **rule)
        ref = select_blocks_reference(q, k, block_size=64, scores=scores, **rule)
        assert torch.equal(fast, ref)


def test_select_blocks_traces_without_host_sync():
    # fullgraph=True fails on .item(), .tolist() or Python branching on tensor values.
    q, k = _qk(seq=300)
    forced = _forced("sink+text", 300, 64)
    for rule in ({"density": 0.2}, {"mass_threshold": 0.6}):
        fn = torch.compile(select_blocks, fullgraph=True, backend="eager")
        out = fn(q, k, block_size=64, forced=forced, **rule)
        assert torch.equal(out, select_blocks(q, k, block_size=64, forced=forced, **rule))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"block_size": 96, "density": 0.2}, "use 64 or 128"),
        ({"density": 0.0}, r"density must be in \(0, 1\]"),
        ({"density": 1.5}, r"density must be in \(0, 1\]"),
        ({"mass_threshold": 0.0}, r"mass_threshold must be in \(0, 1\]"),
        ({}, "exactly one of"),
        ({"density": 0.2, "mass_threshold": 0.5}, "exactly one of"),
        ({"density": 0.2, "scores": torch.rand(2, 3, 4, 4)}, "scores must be"),
        ({"density": 0.2, "forced": ForcedBlocks(torch.zeros(4, dtype=torch.bool),
                                                 torch.zeros(4, dtype=torch.bool))},
         "forced_blocks"),
    ],
)
def test_selection_errors(kwargs, match):
    q, k = _qk(seq=300)
    with pytest.raises(ValueError, match=match):
        select_blocks(q, k, **kwargs)
    with pytest.raises(ValueError, match=match):
        select_blocks_reference(q, k, **kwargs)


def test_shape_mismatch_errors():
    q, k = _qk(seq=300)
    with pytest.raises(ValueError, match="same shape"):
        select_blocks(q, k[:, :, :200], density=0.5)
    with pytest.raises(ValueError, match=r"\[B, H, S, D\]"):
        block_mean_scores(q[0], k[0])
    with pytest.raises(ValueError, match="sink_tokens must be a bool tensor of shape"):
        forced_blocks(300, 64, sink_tokens=torch.ones(299, dtype=torch.bool))
    with pytest.raises(ValueError, match="1-D bool"):
        ForcedBlocks(torch.zeros(3), torch.zeros(3, dtype=torch.bool))
