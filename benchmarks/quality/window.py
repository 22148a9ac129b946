"""Static spatiotemporal window mask (sliding-tile style) at a chosen density, run through
ditplan's block-sparse kernel by a Wan self-attention processor.

Each 128-token block of the tile-permuted sequence has a centroid in normalized (frame, row,
column) coordinates; every query block keeps the ``ceil(density * blocks)`` key blocks nearest to
it (L-infinity distance, Euclidean distance then block index breaking ties). The map is fixed:
it never looks at the inputs, unlike block-mean selection.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from benchmarks.quality.methods import Installed, Method, dense_warmup_steps, transformer_of
from ditplan.runtime.adapters.base import get_adapter
from ditplan.runtime.adapters.wan import diffusers_rotary, wan_self_attention_qkv
from ditplan.runtime.context import StepTracker, install_step_tracker, remove_step_tracker
from ditplan.runtime.kernels import block_sparse_attention
from ditplan.runtime.permutation import TokenPermuter, install_permute_points
from ditplan.runtime.sparse import restore_processors

_TIE = 1e-3  # weight of the Euclidean tie-break: far below the 1/size spacing of centroids


def block_centroids(order: torch.Tensor, grid: tuple[int, int, int],
                    block_size: int) -> torch.Tensor:
    """Mean normalized (frame, row, column) of each block's tokens.

    Args:
        order: int64 [S], original (frame, row, col)-flattened index of each position.
        grid: (F, H, W) video tokens; S = F * H * W.
        block_size: tokens per block (the last block may be partial).

    Returns:
        float64 [ceil(S / block_size), 3].
    """
    frames, height, width = grid
    coords = torch.stack([order // (height * width) / frames, order // width % height / height,
                          order % width / width], dim=-1).double()  # [S, 3]
    block = torch.arange(order.numel(), device=order.device) // block_size  # [S]
    blocks = int(block[-1]) + 1
    sums = torch.zeros(blocks, 3, dtype=torch.float64, device=order.device)
    sums.index_add_(0, block, coords)
    counts = torch.bincount(block, minlength=blocks).double()  # [Qb]
    return sums / counts[:, None]


def window_block_map(order: torch.Tensor, grid: tuple[int, int, int], block_size: int,
                     density: float) -> torch.Tensor:
    """The static window map: each query block keeps its nearest ``ceil(density * Kb)`` blocks.

    Returns:
        bool [1, 1, Qb, Kb] (Qb == Kb), diagonal always kept.
    """
    centroids = block_centroids(order, grid, block_size)  # [Nb, 3]
    gap = (centroids[:, None, :] - centroids[None, :, :]).abs()  # [Nb, Nb, 3]
    distance = gap.amax(dim=-1) + _TIE * gap.norm(dim=-1)  # [Nb, Nb]
    blocks = centroids.shape[0]
    keep = max(1, math.ceil(density * blocks))
    nearest = torch.sort(distance, dim=-1, stable=True).indices[:, :keep]  # [Nb, keep]
    block_map = torch.zeros(blocks, blocks, dtype=torch.bool, device=order.device)
    block_map.scatter_(1, nearest, True)
    return block_map[None, None]


def window_block_map_reference(order: torch.Tensor, grid: tuple[int, int, int],
                               block_size: int, density: float) -> torch.Tensor:
    """:func:`window_block_map` with Python loops over tokens and blocks (test oracle)."""
    frames, height, width = grid
    members: list[list[tuple[float, float, float]]] = []
    for position, index in enumerate(order.tolist()):
        if position % block_size == 0:
            members.append([])
        f, rest = divmod(index, height * width)
        members[-1].append((f / frames, rest // width / height, rest % width / width))
    centres = [tuple(sum(c[a] for c in m) / len(m) for a in range(3)) for m in members]
    blocks = len(centres)
    keep = max(1, math.ceil(density * blocks))
    block_map = torch.zeros(1, 1, blocks, blocks, dtype=torch.bool)
    for i, ci in enumerate(centres):
        def key(j, ci=ci):
            gaps = [abs(ci[a] - centres[j][a]) for a in range(3)]
            return (max(gaps) + _TIE * math.sqrt(sum(g * g for g in gaps)), j)
        for j in sorted(range(blocks), key=key)[:keep]:
            block_map[0, 0, i, j] = True
    return block_map


@dataclass
class StaticWindow:
    """Settings and cached block maps shared by every layer's processor."""

    density: float
    block_size: int
    dense_steps: tuple[int, ...]
    tracker: StepTracker
    permuter: TokenPermuter
    backend: str
    _maps: dict = field(default_factory=dict)

    def sparse_now(self) -> bool:
        return self.tracker.state.step not in self.dense_steps

    def block_map(self, device: torch.device) -> torch.Tensor:
        """bool [1, 1, Nb, Nb] for the current layout, in the current token order."""
        layout, active = self.permuter.layout, self.permuter.active
        key = (layout, active, str(device))
        if key not in self._maps:
            order = (self.permuter.perm if active
                     else torch.arange(layout.video_tokens, device=device))
            self._maps[key] = window_block_map(order, layout.grid, self.block_size,
                                               self.density).to(device)
        return self._maps[key]


class StaticWindowProcessor:
    """Wan self-attention with the static window map; the original processor otherwise."""

    def __init__(self, original, window: StaticWindow):
        self.original = original
        self.window = window

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 rotary_emb=None):
        if encoder_hidden_states is not None or attention_mask is not None or \
                not self.window.sparse_now():
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask,
                                 diffusers_rotary(attn, rotary_emb))
        q, k, v = wan_self_attention_qkv(attn, hidden_states, rotary_emb)  # [B, H, S, D]
        block_map = self.window.block_map(q.device)  # [1, 1, Nb, Nb]
        out = block_sparse_attention(q, k, v, block_map, block_size=self.window.block_size,
                                     backend=self.window.backend)  # [B, H, S, D]
        out = out.transpose(1, 2).flatten(2, 3).type_as(q)  # [B, S, H*D]
        return attn.to_out[1](attn.to_out[0](out))


def static_window(density: float, *, steps: int, block_size: int, tile: tuple[int, int, int],
                  backend: str, dense_fraction: float) -> Method:
    """The static window method; its dense warm-up matches RainFusion2.0's for a fair pairing."""
    dense_steps = dense_warmup_steps(steps, dense_fraction)

    def install(pipe) -> Installed:
        transformer = transformer_of(pipe)
        adapter = get_adapter(transformer)
        tracker = install_step_tracker(transformer, steps)
        window = StaticWindow(density, block_size, dense_steps, tracker, TokenPermuter(tile),
                              backend)
        originals = {}
        for _, attn in adapter.attention_layers(transformer):
            originals[attn] = attn.processor
            attn.set_processor(StaticWindowProcessor(attn.processor, window))
        hooks = install_permute_points(transformer, adapter, window.permuter)

        def undo() -> None:
            restore_processors(originals)
            for hook in hooks:
                hook.remove()
            remove_step_tracker(transformer)

        return Installed(undo=undo)

    params = dict(density=density, dense_steps=len(dense_steps), block_size=block_size,
                  tile=list(tile))
    return Method("window-static", f"d={density:g}", install, params)

