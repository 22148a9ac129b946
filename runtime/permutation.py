"""Once-per-forward spatiotemporal token permutation: tables, cached per token layout and device."""

from __future__ import annotations

import torch

from ditplan.runtime.kernels.block_map import ForcedBlocks, forced_blocks
from ditplan.runtime.kernels.permute import (
    first_frame_mask,
    invert_permutation,
    tile_permutation,
)
from ditplan.runtime.layout import TokenLayout


class TokenPermuter:
    """Owns the permutation of one transformer's self-attention tokens.

    The adapter's hooks call :meth:`begin` at the start of each forward with the live token
    layout; when :attr:`active` they permute hidden states and rotary tables with :attr:`perm`
    and undo it with :attr:`inverse` at the end. Sparse layers ask :meth:`forced` for the
    always-kept blocks (first-frame sink, text) in permuted order.
    """

    def __init__(
        self, tile: tuple[int, int, int], expected_grid: tuple[int, int, int] | None = None
    ):
        self.tile = tuple(tile)
        self.expected_grid = expected_grid
        self.layout: TokenLayout | None = None
        self.active = False
        self._memo = None
        self._tables: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        self._forced: dict[tuple, ForcedBlocks] = {}

    def begin(self, layout: TokenLayout, device: torch.device, active: bool) -> None:
        """Start a forward with this layout; ``active`` says whether tokens get permuted."""
        if self.expected_grid is not None and layout.grid != tuple(self.expected_grid):
            raise ValueError(
                f"the plan was compiled for a {self.expected_grid} token grid (frames, height, "
                f"width), these latents give {layout.grid}; generate at the plan's workload or "
                "profile and compile a plan for this size"
            )
        self.layout = layout
        self.device = torch.device(device)
        self.active = active and self.tile != (1, 1, 1)
        self._memo = None

    def permute_once(self, x: torch.Tensor) -> torch.Tensor:
        """``x[:, perm]``, computed once per forward for a tensor every block receives."""
        if self._memo is None or self._memo[0] is not x:
            self._memo = (x, x[:, self.perm])
        return self._memo[1]

    def _key(self) -> tuple:
        # Plain values, not the TokenLayout itself: when a compiled model's first call is also
        # its first forward, dynamo (torch 2.11) re-created a frozen-dataclass dict key and
        # hashed it before setting its fields, and crashed.
        layout = self.layout
        return (*layout.grid, layout.text_len, layout.text_first, self.device)

    def _ensure_tables(self) -> tuple[torch.Tensor, torch.Tensor]:
        key = self._key()
        if key not in self._tables:
            layout = self.layout
            perm = tile_permutation(
                layout.grid,
                self.tile,
                text_len=layout.text_len,
                text_first=layout.text_first,
                device=self.device,
            )
            self._tables[key] = (perm, invert_permutation(perm))
        return self._tables[key]

    @property
    def perm(self) -> torch.Tensor:
        """Gather index [S]: permuted = x[:, perm]."""
        return self._ensure_tables()[0]

    @property
    def inverse(self) -> torch.Tensor:
        """Gather index [S] undoing :attr:`perm`."""
        return self._ensure_tables()[1]

    def forced(self, block_size: int, sink: bool) -> ForcedBlocks:
        """Always-computed blocks for the current layout, in the current token order."""
        key = (*self._key(), self.active, block_size, sink)
        if key not in self._forced:
            self._forced[key] = self._build_forced(block_size, sink)
        return self._forced[key]

    def token_masks(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(first-frame sink, text) token flags, bool [S] each, in the current token order."""
        layout = self.layout
        where = dict(text_len=layout.text_len, text_first=layout.text_first, device=self.device)
        sink = first_frame_mask(layout.grid, **where)
        text = ~first_frame_mask(layout.grid, frames=layout.frames, **where)
        if self.active:
            sink, text = sink[self.perm], text[self.perm]
        return sink, text

    def _build_forced(self, block_size: int, sink: bool) -> ForcedBlocks:
        sink_tokens, text_tokens = self.token_masks()
        return forced_blocks(
            self.layout.seq_len,
            block_size,
            sink_tokens=sink_tokens if sink else None,
            text_tokens=text_tokens if self.layout.text_len else None,
            device=self.device,
        )
