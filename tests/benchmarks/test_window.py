"""The static window block map against its loop reference, and its density and symmetry."""

from __future__ import annotations

import math

import pytest
import torch

from benchmarks.quality.window import window_block_map, window_block_map_reference
from ditplan.runtime.kernels import tile_permutation

CASES = [  # grid (F, H, W), tile, block size, density
    ((4, 8, 8), (1, 8, 8), 64, 0.2),
    ((3, 6, 10), (1, 4, 4), 64, 0.5),
    ((5, 9, 7), (2, 4, 4), 64, 0.1),
    ((2, 16, 16), (1, 8, 8), 128, 0.3),
]


@pytest.mark.parametrize(("grid", "tile", "block_size", "density"), CASES)
def test_matches_reference_on_tiled_and_random_orders(grid, tile, block_size, density):
    generator = torch.Generator().manual_seed(sum(grid))
    tokens = math.prod(grid)
    for order in (tile_permutation(grid, tile), torch.randperm(tokens, generator=generator)):
        fast = window_block_map(order, grid, block_size, density)
        assert torch.equal(fast, window_block_map_reference(order, grid, block_size, density))


@pytest.mark.parametrize(("grid", "tile", "block_size", "density"), CASES)
def test_every_row_keeps_its_share_and_the_diagonal(grid, tile, block_size, density):
    block_map = window_block_map(tile_permutation(grid, tile), grid, block_size, density)[0, 0]
    blocks = block_map.shape[0]
    assert block_map.shape == (blocks, math.ceil(math.prod(grid) / block_size))
    assert (block_map.sum(dim=1) == max(1, math.ceil(density * blocks))).all()
    assert block_map.diagonal().all()


def test_window_is_local():
    # 8 frames of one 8 x 8 tile each, 64-token blocks: block i is frame i. Keeping 3 of 8
    # blocks must keep the frame itself and its nearest frames, never a far one.
    grid = (8, 8, 8)
    block_map = window_block_map(tile_permutation(grid, (1, 8, 8)), grid, 64, 3 / 8)[0, 0]
    assert block_map[4].nonzero().flatten().tolist() == [3, 4, 5]
    assert block_map[0].nonzero().flatten().tolist() == [0, 1, 2]
