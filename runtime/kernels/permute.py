"""Spatiotemporal tile permutation: each block of consecutive tokens becomes a t x h x w tile."""

from __future__ import annotations

import torch

Grid = tuple[int, int, int]  # (frames, height, width) in tokens


def _check_grid(grid: Grid, tile: Grid, text_len: int) -> None:
    if len(grid) != 3 or any(int(n) != n or n < 1 for n in grid):
        raise ValueError(f"grid must be 3 positive ints (frames, height, width); got {grid!r}")
    if len(tile) != 3 or any(int(n) != n or n < 1 for n in tile):
        raise ValueError(f"tile must be 3 positive ints (t, h, w); got {tile!r}")
    if int(text_len) != text_len or text_len < 0:
        raise ValueError(f"text_len must be a non-negative int; got {text_len!r}")


def _tile_coords(size: int, tile: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # Per index along one axis: tile index, offset inside the tile, size of that (edge) tile.
    idx = torch.arange(size, device=device)
    tile_idx = torch.div(idx, tile, rounding_mode="floor")
    extent = torch.clamp(size - tile_idx * tile, max=tile)
    return tile_idx, idx - tile_idx * tile, extent


def _video_destination(grid: Grid, tile: Grid, device) -> torch.Tensor:
    # Position in the tiled order of every video token, in original (frame, row, col) order.
    frames, height, width = grid
    tf, th, tw = tile
    fb, ft, sf = (c[:, None, None] for c in _tile_coords(frames, tf, device))  # [F, 1, 1]
    hb, ht, sh = (c[None, :, None] for c in _tile_coords(height, th, device))  # [1, H, 1]
    wb, wt, sw = (c[None, None, :] for c in _tile_coords(width, tw, device))  # [1, 1, W]
    # Tokens before this tile: whole tile-frames, then whole tile-rows of this tile-frame (sf
    # frames deep), then the tiles to the left in this tile-row (sf x sh each); then the offset
    # inside the tile, (t, h, w) row-major over the tile's own (possibly edge) extent.
    before = fb * tf * height * width + hb * th * width * sf + wb * tw * sf * sh
    inside = (ft * sh + ht) * sw + wt
    return (before + inside).reshape(-1)  # [F*H*W]


def tile_permutation(
    grid: Grid, tile: Grid = (1, 8, 8), *, text_len: int = 0, text_first: bool = False,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Gather index that groups video tokens into contiguous spatiotemporal tiles.

    `x[..., perm, :]` reorders tokens from diffusers' (frame, row, col) flatten to tiles of
    tf x th x tw tokens in (tile-frame, tile-row, tile-col) order, tokens inside a tile in
    (t, h, w) row-major order. Sides that are not multiples of the tile get smaller edge tiles
    (no token lost or duplicated). Text tokens stay where they are.

    Args:
        grid: (F, H, W) video tokens per side.
        tile: (tf, th, tw) tile shape; a side larger than the grid gives one tile on it.
        text_len: number of text tokens, before the video if text_first else after it.
        text_first: where the text tokens sit.
        device: device of the returned index.

    Returns:
        int64 [S], S = text_len + F*H*W, a permutation of arange(S).
    """
    _check_grid(grid, tile, text_len)
    destination = _video_destination(grid, tile, device)  # [V]
    video = torch.empty_like(destination)
    video[destination] = torch.arange(destination.numel(), device=device)  # invert dest -> gather
    if text_len == 0:
        return video
    if text_first:
        return torch.cat([torch.arange(text_len, device=device), video + text_len])
    return torch.cat([video, torch.arange(text_len, device=device) + video.numel()])


def tile_permutation_reference(
    grid: Grid, tile: Grid = (1, 8, 8), *, text_len: int = 0, text_first: bool = False,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """tile_permutation written as plain Python loops over tiles and tokens (test oracle)."""
    _check_grid(grid, tile, text_len)
    frames, height, width = grid
    tf, th, tw = tile
    offset = text_len if text_first else 0
    order = list(range(text_len)) if text_first else []
    for f0 in range(0, frames, tf):
        for h0 in range(0, height, th):
            for w0 in range(0, width, tw):
                for f in range(f0, min(f0 + tf, frames)):
                    for h in range(h0, min(h0 + th, height)):
                        for w in range(w0, min(w0 + tw, width)):
                            order.append(offset + (f * height + h) * width + w)
    if not text_first:
        video = frames * height * width
        order.extend(range(video, video + text_len))
    return torch.tensor(order, dtype=torch.long, device=device)


def invert_permutation(perm: torch.Tensor) -> torch.Tensor:
    """Inverse gather index: x[..., perm, :][..., invert_permutation(perm), :] == x.

    Args:
        perm: int64 [S], a permutation of arange(S).

    Returns:
        int64 [S].
    """
    if perm.ndim != 1:
        raise ValueError(f"perm must be 1-D [S]; got shape {tuple(perm.shape)}")
    inverse = torch.empty_like(perm)
    inverse[perm] = torch.arange(perm.numel(), device=perm.device)
    return inverse


def permute_tokens(x: torch.Tensor, perm: torch.Tensor, dim: int = -2) -> torch.Tensor:
    """x reordered along `dim` by the gather index `perm` ([S], S = x.shape[dim])."""
    if perm.ndim != 1 or perm.numel() != x.shape[dim]:
        raise ValueError(f"perm has {perm.numel()} entries but x has {x.shape[dim]} tokens "
                         f"along dim {dim}")
    return x.index_select(dim, perm)


def first_frame_mask(
    grid: Grid, *, frames: int = 1, text_len: int = 0, text_first: bool = False,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Tokens of the first `frames` video frames (the attention sink), in ORIGINAL token order.

    Index it with the permutation (`mask[perm]`) before passing it to `forced_blocks`.

    Args:
        grid: (F, H, W) video tokens per side.
        frames: how many leading frames count as sink.
        text_len, text_first: text token count and position (text tokens are not sink).
        device: device of the returned mask.

    Returns:
        bool [S], S = text_len + F*H*W.
    """
    _check_grid(grid, (1, 1, 1), text_len)
    height, width = grid[1], grid[2]
    video = torch.arange(grid[0] * height * width, device=device) < frames * height * width
    text = torch.zeros(text_len, dtype=torch.bool, device=device)
    return torch.cat([text, video] if text_first else [video, text])
