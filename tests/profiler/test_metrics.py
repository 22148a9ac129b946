"""Tiled attention statistics equal the naive full-matrix computation; hand-computed tiny cases."""

from __future__ import annotations

import math

import pytest
import torch

from ditplan.profiler import metrics as M
from ditplan.runtime.kernels.block_map import forced_blocks
from ditplan.runtime.kernels.permute import first_frame_mask, tile_permutation

# float64: the tiled and the naive path differ only in summation order, so agreement is at the
# level of a few ulps times the reduction length (S <= 200 terms): 1e-12 is ~50x that.
TOL64 = dict(rtol=1e-10, atol=1e-12)
# float32: softmax over <= 200 keys and sums of <= 200 terms carry ~S * 6e-8 ≈ 1.2e-5 relative
# error in the worst case; compared against the float64 oracle.
TOL32 = dict(rtol=2e-5, atol=2e-6)
SHAPES = [(1, 2, 200, 16), (2, 1, 128, 8), (1, 3, 64, 16), (1, 1, 70, 8)]


def qk(shape, dtype=torch.float64, spread=2.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(shape, generator=g, dtype=torch.float64) * spread
    k = torch.randn(shape, generator=g, dtype=torch.float64) * spread
    return q.to(dtype), k.to(dtype)


def assert_summary_close(fast, ref, tol):
    torch.testing.assert_close(fast.block_mass.double(), ref.block_mass, **tol)
    torch.testing.assert_close(fast.entropy.double(), ref.entropy, **tol)
    torch.testing.assert_close(fast.received.double(), ref.received, **tol)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("tile_rows", [64, 128, None])
def test_summary_equals_full_matrix_float64(shape, tile_rows):
    q, k = qk(shape)
    fast = M.attention_summary(q, k, block_size=64, tile_rows=tile_rows)
    assert_summary_close(fast, M.attention_summary_reference(q, k, block_size=64), TOL64)


@pytest.mark.parametrize("shape", SHAPES[:2])
def test_summary_float32_close_to_float64_oracle(shape):
    q, k = qk(shape, dtype=torch.float32)
    fast = M.attention_summary(q, k, block_size=64, tile_rows=64)
    assert fast.block_mass.dtype == torch.float32
    assert_summary_close(fast, M.attention_summary_reference(q, k, block_size=64), TOL32)


def test_summary_rows_sum_to_one():
    q, k = qk((1, 2, 200, 16))
    s = M.attention_summary(q, k, block_size=64, tile_rows=64)
    torch.testing.assert_close(s.block_mass.sum(-1), torch.ones(1, 2, 4, dtype=torch.float64))
    torch.testing.assert_close(s.received.sum(-1), torch.ones(1, 2, dtype=torch.float64))
    assert ((s.entropy > 0) & (s.entropy < 1)).all()


def test_uniform_attention_hand_computed():
    # q = 0: every query attends uniformly to the S = 160 keys (blocks of 64, 64, 32 tokens).
    q, k = torch.zeros(1, 1, 160, 8), torch.randn(1, 1, 160, 8)
    s = M.attention_summary(q, k, block_size=64, tile_rows=64)
    expected_row = torch.tensor([64 / 160, 64 / 160, 32 / 160])
    torch.testing.assert_close(s.block_mass[0, 0], expected_row.expand(3, 3))
    torch.testing.assert_close(s.entropy, torch.ones(1, 1))
    torch.testing.assert_close(s.received, torch.full((1, 1, 160), 1 / 160))
    sink = torch.tensor([True, False, False])
    torch.testing.assert_close(M.mass_on_blocks(s, sink), torch.tensor([[0.4]]))


def concentrated_qk():
    # 128 keys in two blocks of 64: block 0 keys point along e0, block 1 along e1, with a large
    # norm; every query points along e0. So all mass spreads evenly over block 0's 64 keys
    # (exp(-400 * 10 / sqrt(2)) underflows to exactly 0 in float64).
    k = torch.zeros(1, 1, 128, 2, dtype=torch.float64)
    k[..., :64, 0], k[..., 64:, 1] = 20.0, 20.0
    q = torch.zeros(1, 1, 128, 2, dtype=torch.float64)
    q[..., 0] = 20.0
    return q, k


def test_concentrated_attention_hand_computed():
    q, k = concentrated_qk()
    s = M.attention_summary(q, k, block_size=64, tile_rows=64)
    torch.testing.assert_close(s.block_mass[0, 0], torch.tensor([[1.0, 0.0], [1.0, 0.0]],
                                                                dtype=torch.float64))
    # Entropy of a uniform row over 64 of 128 keys: ln 64 / ln 128 = 6 / 7.
    torch.testing.assert_close(s.entropy, torch.tensor([[6 / 7]], dtype=torch.float64))
    curves = M.recall_at_densities(q, k, s, densities=(0.5,), forced=None)
    assert curves.predicted.item() == pytest.approx(1.0)  # block means rank block 0 first
    assert curves.oracle.item() == pytest.approx(1.0)
    assert curves.kept_fraction.item() == pytest.approx(0.5)
    # Foreground = tokens 0..31. High-attention (ā > 1/128): tokens 0..63 with ā = 1/64.
    fg = torch.arange(128) < 32
    stats = M.foreground_stats(s.received, fg, torch.ones(128, dtype=torch.bool), 1.0)
    assert stats.r_attn.item() == pytest.approx(0.5)  # 32 of 64 high tokens are foreground
    # fg tokens get 1/64 each; bg tokens (96) share 32 * 1/64 = 0.5, i.e. 1/192 each: ratio 3.
    assert stats.fg_bg_mass_ratio.item() == pytest.approx(3.0)
    assert stats.foreground_fraction.item() == pytest.approx(0.25)


@pytest.mark.parametrize("shape", SHAPES)
def test_mass_on_blocks_equals_full_matrix(shape):
    q, k = qk(shape)
    s = M.attention_summary(q, k, block_size=64, tile_rows=64)
    nb = math.ceil(shape[2] / 64)
    blocks = torch.arange(nb) % 2 == 0
    torch.testing.assert_close(M.mass_on_blocks(s, blocks),
                               M.mass_on_blocks_reference(q, k, blocks, block_size=64), **TOL64)


def video_forced(grid, block_size=64):
    perm = tile_permutation(grid, (1, 4, 4))
    sink = first_frame_mask(grid)[perm]
    return forced_blocks(sink.numel(), block_size, sink_tokens=sink)


@pytest.mark.parametrize("grid", [(3, 8, 8), (2, 8, 12), (4, 5, 7)])
@pytest.mark.parametrize("with_forced", [True, False])
def test_recall_equals_full_matrix(grid, with_forced):
    seq_len = grid[0] * grid[1] * grid[2]
    q, k = qk((2, 2, seq_len, 16), seed=seq_len)
    forced = video_forced(grid) if with_forced else None
    densities = (0.05, 0.1, 0.2, 0.3, 0.5)
    s = M.attention_summary(q, k, block_size=64, tile_rows=64)
    fast = M.recall_at_densities(q, k, s, densities=densities, forced=forced)
    ref = M.recall_at_densities_reference(q, k, block_size=64, densities=densities, forced=forced)
    for name in ("predicted", "oracle", "kept_fraction"):
        torch.testing.assert_close(getattr(fast, name).double(), getattr(ref, name), **TOL64)
    assert fast.predicted.shape == (2, 2, 5)
    # Recall grows with density, and without forced blocks the oracle (true top-n) bounds
    # the prediction (same n per row) from above.
    assert (fast.predicted.diff(dim=-1) >= -1e-12).all()
    if not with_forced:
        assert (fast.oracle >= fast.predicted - 1e-12).all()


@pytest.mark.parametrize("threshold", [0.5, 1.0, 2.0])
@pytest.mark.parametrize("shape", SHAPES[:3])
def test_foreground_stats_equal_full_matrix(threshold, shape):
    q, k = qk(shape, spread=3.0)
    g = torch.Generator().manual_seed(3)
    video = torch.ones(shape[2], dtype=torch.bool)
    video[-5:] = False  # a few text tokens: excluded from every statistic
    fg = (torch.rand(shape[2], generator=g) < 0.3) & video
    s = M.attention_summary(q, k, block_size=64, tile_rows=64)
    fast = M.foreground_stats(s.received, fg, video, threshold)
    ref = M.foreground_stats_reference(q, k, fg, video, threshold)
    for name in ("r_attn", "fg_bg_mass_ratio", "foreground_fraction"):
        torch.testing.assert_close(getattr(fast, name).double(), getattr(ref, name), **TOL64)


def test_foreground_stats_degenerate_masks_take_chance_values():
    received = torch.softmax(torch.randn(1, 2, 50), -1)
    video = torch.ones(50, dtype=torch.bool)
    none = M.foreground_stats(received, torch.zeros(50, dtype=torch.bool), video, 1.0)
    assert torch.equal(none.fg_bg_mass_ratio, torch.ones(1, 2))
    assert torch.equal(none.r_attn, torch.zeros(1, 2))
    # threshold so high no token is high-attention: r_attn = the foreground fraction.
    fg = torch.arange(50) < 10
    nobody = M.foreground_stats(received, fg, video, 1e6)
    torch.testing.assert_close(nobody.r_attn, torch.full((1, 2), 0.2))


def test_foreground_stats_rejects_bad_masks():
    with pytest.raises(ValueError, match="bool tensor of shape"):
        M.foreground_stats(torch.rand(1, 1, 8), torch.zeros(7, dtype=torch.bool),
                           torch.ones(8, dtype=torch.bool), 1.0)


def test_step_change_equals_reference_and_hand_values():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 30, 16, generator=g), torch.randn(2, 30, 16, generator=g)
    # float32 sums over 960 elements: relative error ~ 960 * 6e-8 ≈ 6e-5 at worst.
    torch.testing.assert_close(M.step_change(a, b).double(), M.step_change_reference(a, b),
                               rtol=1e-4, atol=1e-6)
    x = torch.tensor([1.0, 2.0, 3.0])
    assert M.step_change(x, x).tolist() == pytest.approx([0.0, 0.0], abs=1e-7)
    # 2x: rel L1 = sum|x| / sum|x| = 1, cosine distance 0.
    assert M.step_change(2 * x, x).tolist() == pytest.approx([1.0, 0.0], abs=1e-6)
    # Orthogonal: cosine distance 1.
    e0, e1 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    assert M.step_change(e1, e0).tolist() == pytest.approx([2.0, 1.0])


def test_bad_inputs_are_refused():
    q, k = qk((1, 1, 64, 8))
    with pytest.raises(ValueError, match="block_size"):
        M.attention_summary(q, k, block_size=32)
    with pytest.raises(ValueError, match="same shapes|equal shapes"):
        M.attention_summary(q, k[:, :, :32], block_size=64)
    with pytest.raises(ValueError, match="equal shapes"):
        M.step_change(torch.zeros(3), torch.zeros(4))


def test_default_tile_rows_respects_the_memory_budget():
    q = torch.zeros(1, 12, 32760, 2)
    rows = M.default_tile_rows(q, 128)
    assert rows % 128 == 0 and rows * 12 * 32760 * 4 <= M.DEFAULT_TILE_BYTES
    assert M.default_tile_rows(q, 128, max_bytes=1) == 128


@pytest.mark.gpu
def test_summary_at_wan_480p_scale_fits_and_is_exact_on_the_first_block():
    # Wan2.1-1.3B at 480p x 81 frames: S = 32,760 tokens, 12 heads of 128, bf16 inputs.
    g = torch.Generator(device="cuda").manual_seed(0)
    shape = (1, 12, 32760, 128)
    q = torch.randn(shape, generator=g, device="cuda").to(torch.bfloat16)
    k = torch.randn(shape, generator=g, device="cuda").to(torch.bfloat16)
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    s = M.attention_summary(q, k, block_size=128)
    peak = torch.cuda.max_memory_allocated() - base
    assert peak < 4 * M.DEFAULT_TILE_BYTES  # an S x S float32 matrix would be 51.5 GB
    # Rows 0..127 (query block 0) in float64 from the full key set: [12, 128, S].
    probs = torch.softmax(q[0, :, :128].double() @ k[0].double().transpose(-1, -2)
                          / math.sqrt(128), dim=-1)
    pooled = torch.nn.functional.pad(probs, (0, 256 * 128 - 32760)).unflatten(-1, (256, 128))
    expected = pooled.sum(-1).mean(-2)  # [12, 256]
    # float32 softmax over 32,760 keys: relative error ~1e-6 per entry, summed over a block.
    torch.testing.assert_close(s.block_mass[0, :, 0].double(), expected, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(s.block_mass.sum(-1), torch.ones(1, 12, 256, device="cuda"),
                               rtol=0, atol=1e-4)
