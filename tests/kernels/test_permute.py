"""Tile permutation: vectorized index == loop reference exactly, inverse, tile contiguity, masks."""

from __future__ import annotations

import pytest
import torch

from ditplan.runtime.kernels import (
    first_frame_mask,
    invert_permutation,
    permute_tokens,
    tile_permutation,
    tile_permutation_reference,
)

GRIDS_AND_TILES = [
    ((21, 30, 52), (1, 8, 8)),  # Wan 480p x 81 frames: 30 and 52 are not multiples of 8
    ((3, 16, 16), (1, 8, 8)),  # exact multiples
    ((5, 7, 9), (2, 4, 4)),  # non-multiples on every side
    ((4, 6, 10), (2, 8, 16)),  # tile larger than the grid in h and w
    ((2, 3, 4), (8, 8, 8)),  # tile larger than the grid everywhere: one tile
    ((1, 1, 1), (1, 8, 8)),  # single token
    ((3, 12, 20), (3, 1, 5)),
]


@pytest.mark.parametrize("text_first", [False, True])
@pytest.mark.parametrize("text_len", [0, 7])
@pytest.mark.parametrize("grid,tile", GRIDS_AND_TILES)
def test_fast_equals_reference(grid, tile, text_len, text_first):
    fast = tile_permutation(grid, tile, text_len=text_len, text_first=text_first)
    ref = tile_permutation_reference(grid, tile, text_len=text_len, text_first=text_first)
    assert fast.dtype == torch.long
    assert torch.equal(fast, ref)
    assert torch.equal(fast.sort().values, torch.arange(ref.numel()))  # a true permutation


@pytest.mark.parametrize("grid", [(2, 5, 7), (21, 30, 52)])
def test_unit_tile_is_identity(grid):
    perm = tile_permutation(grid, (1, 1, 1), text_len=3)
    assert torch.equal(perm, torch.arange(perm.numel()))


def test_text_tokens_stay_in_place():
    video = 2 * 4 * 4
    first = tile_permutation((2, 4, 4), (1, 2, 2), text_len=5, text_first=True)
    last = tile_permutation((2, 4, 4), (1, 2, 2), text_len=5, text_first=False)
    assert torch.equal(first[:5], torch.arange(5))
    assert torch.equal(last[video:], torch.arange(video, video + 5))
    assert torch.equal(first[5:] - 5, last[:video])


def test_blocks_are_compact_tiles():
    # grid (2, 16, 16), tile (1, 8, 8): every 64 consecutive permuted tokens share one frame and
    # one 8x8 window, and windows come in (frame, tile-row, tile-col) order.
    perm = tile_permutation((2, 16, 16), (1, 8, 8))
    frame, row, col = perm // 256, (perm // 16) % 16, perm % 16
    for block in range(8):
        sl = slice(64 * block, 64 * (block + 1))
        assert frame[sl].unique().numel() == 1 and frame[sl][0] == block // 4
        assert (row[sl] // 8).unique().tolist() == [(block // 2) % 2]
        assert (col[sl] // 8).unique().tolist() == [block % 2]
    # inside a tile: (h, w) row-major
    assert perm[:10].tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 16, 17]


def test_edge_tiles_are_smaller():
    # width 10 with tile width 4: tiles of 4, 4, 2 columns; first tile-row holds 3 tiles.
    perm = tile_permutation((1, 2, 10), (1, 2, 4))
    assert perm.tolist() == [0, 1, 2, 3, 10, 11, 12, 13, 4, 5, 6, 7, 14, 15, 16, 17,
                             8, 9, 18, 19]


@pytest.mark.parametrize("grid,tile", GRIDS_AND_TILES[:4])
def test_inverse_round_trip(grid, tile):
    perm = tile_permutation(grid, tile, text_len=4)
    inverse = invert_permutation(perm)
    x = torch.randn(2, 3, perm.numel(), 5)  # [B, H, S, D]
    assert torch.equal(permute_tokens(permute_tokens(x, perm), inverse), x)
    assert torch.equal(perm[inverse], torch.arange(perm.numel()))
    assert torch.equal(permute_tokens(x, perm, dim=2), x[:, :, perm])


def test_first_frame_mask_follows_permutation():
    grid, tile = (3, 4, 6), (2, 2, 4)
    mask = first_frame_mask(grid, text_len=2, text_first=True)
    assert mask.sum() == 24 and not mask[:2].any() and mask[2:26].all()
    perm = tile_permutation(grid, tile, text_len=2, text_first=True)
    permuted = mask[perm]  # what forced_blocks expects
    assert torch.equal(permuted, (perm >= 2) & (perm < 26))
    assert torch.equal(first_frame_mask(grid, frames=2).nonzero().flatten(), torch.arange(48))


@pytest.mark.parametrize(
    "grid,tile,text_len,match",
    [
        ((0, 4, 4), (1, 8, 8), 0, "grid"),
        ((2, 4), (1, 8, 8), 0, "grid"),
        ((2, 4, 4), (1, 0, 8), 0, "tile"),
        ((2, 4, 4), (1, 8, 8), -1, "text_len"),
    ],
)
def test_bad_arguments_raise(grid, tile, text_len, match):
    with pytest.raises(ValueError, match=match):
        tile_permutation(grid, tile, text_len=text_len)


def test_permute_tokens_length_mismatch_raises():
    with pytest.raises(ValueError, match="tokens"):
        permute_tokens(torch.randn(1, 1, 10, 4), torch.arange(9))
