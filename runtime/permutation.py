"""Once-per-forward spatiotemporal token permutation: tables per layout, hooks at permute points."""

from __future__ import annotations

import dataclasses
import logging
from itertools import groupby

import torch
from diffusers.hooks import HookRegistry, ModelHook
from torch import nn

from ditplan.runtime.kernels.block_map import ForcedBlocks, forced_blocks
from ditplan.runtime.kernels.permute import (
    first_frame_mask,
    invert_permutation,
    tile_permutation,
)
from ditplan.runtime.layout import ForwardArgument, PermutePoint, TokenLayout

PERMUTE_HOOK = "ditplan_permute"

logger = logging.getLogger(__name__)


class TokenPermuter:
    """Owns the permutation of one transformer's self-attention tokens.

    The permute points' hooks (:func:`install_permute_points`) call :meth:`begin` at the start
    of each forward with the live token layout; when :attr:`active` they permute token-ordered
    tensors (video or image tokens only: text never moves) with :attr:`perm` and undo it with
    :attr:`inverse` at the output. Sparse layers see the sequence [video tiles | text] (design
    D4) and ask :meth:`forced` for its always-kept blocks (first-frame sink, text).

    The permutation is static: active on every forward when the tile is not (1, 1, 1), so
    dense steps see permuted tokens too (dense attention is permutation-equivariant).
    """

    def __init__(
        self, tile: tuple[int, int, int], expected_grid: tuple[int, int, int] | None = None
    ):
        self.tile = tuple(tile)
        self.expected_grid = expected_grid
        self.layout: TokenLayout | None = None
        self.active = self.tile != (1, 1, 1)
        self._tables: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        self._forced: dict[tuple, ForcedBlocks] = {}
        self._forced_settings: set[tuple[int, bool]] = set()  # built at each begin()
        self._densities: list[tuple[str, int, bool, float]] = []  # (layer, block, sink, density)
        self._density_checked: set[tuple] = set()  # layouts already checked

    def begin(self, layout: TokenLayout, device: torch.device) -> None:
        """Start a forward with this layout."""
        if self.expected_grid is not None and layout.grid != tuple(self.expected_grid):
            raise ValueError(
                f"the plan was compiled for a {self.expected_grid} token grid (frames, height, "
                f"width), these latents give {layout.grid}; generate at the plan's workload or "
                "profile and compile a plan for this size"
            )
        self.layout = layout
        self.device = torch.device(device)
        for block_size, sink in sorted(self._forced_settings):
            self.forced(block_size, sink)
        self._warn_overforced()

    def build_forced_at_begin(self, block_size: int, sink: bool, *, layer: str | None = None,
                              density: float | None = None) -> None:
        """Build :meth:`forced` for these settings in each :meth:`begin` (the transformer's
        pre-hook), not at the first sparse call: building counts blocks on the host, which
        under torch.compile would break each block's graph at its attention.

        With ``layer`` and ``density`` (its smallest head density), :meth:`begin` also warns once
        per token layout when the forced block pairs alone are more than that density: the layer
        then computes more than its plan says, and its other rows keep only forced blocks.
        """
        self._forced_settings.add((block_size, sink))
        if layer is not None and density is not None:
            self._densities.append((layer, block_size, sink, density))

    def _warn_overforced(self) -> None:
        key = self._key()
        if key in self._density_checked:
            return
        self._density_checked.add(key)
        over = []  # (layer, density, forced share, sink) of the layers asking for less
        for layer, block_size, sink, density in self._densities:
            share = self.forced(block_size, sink).share
            if share > density + 1e-9:
                over.append((layer, density, share, sink))
        if not over:
            return
        layer, density, share, sink = over[0]
        logger.warning(
            "%d sparse layer(s) ask for less than their forced blocks at this %s token grid "
            "(tile %s): %s asks for density %.3g but its forced blocks (%s) are %.3g of the block "
            "pairs, so it computes more than its plan says and keeps only forced blocks in its "
            "other rows%s", len(over), "x".join(map(str, self.layout.grid)),
            "x".join(map(str, self.tile)), layer, density,
            "first-frame sink, diagonal" if sink else "diagonal", share,
            "; profile with --sink off and compile again, or use a tile one frame deep"
            if sink and self.tile[0] > 1 else "")

    def _key(self) -> tuple:
        # Plain values, not the TokenLayout itself: when a compiled model's first call is also
        # its first forward, dynamo (torch 2.11) re-created a frozen-dataclass dict key and
        # hashed it before setting its fields, and crashed.
        layout = self.layout
        return (*layout.grid, layout.text_len, layout.text_first, layout.video, self.device)

    def _ensure_tables(self) -> tuple[torch.Tensor, torch.Tensor]:
        key = self._key()
        if key not in self._tables:
            layout = self.layout
            perm = tile_permutation(layout.grid, self.tile, device=self.device)  # [S_vid]
            self._tables[key] = (perm, invert_permutation(perm))
        return self._tables[key]

    @property
    def perm(self) -> torch.Tensor:
        """Gather index [S_vid] over the video tokens: permuted = x[:, perm]."""
        return self._ensure_tables()[0]

    @property
    def inverse(self) -> torch.Tensor:
        """Gather index [S_vid] undoing :attr:`perm`."""
        return self._ensure_tables()[1]

    @property
    def sequence_perm(self) -> torch.Tensor:
        """Gather index [S_vid + S_txt] from [video | text] (video in native order) to the
        sparse op's order: :attr:`perm` on the video, text in place."""
        layout = self.layout
        position = torch.arange(layout.seq_len, device=self.device)
        if not self.active:
            return position
        return torch.cat([self.perm, position[layout.video_tokens:]])

    def forced(self, block_size: int, sink: bool) -> ForcedBlocks:
        """Always-computed blocks for the current layout, in the sparse op's order."""
        key = (*self._key(), self.active, block_size, sink)
        if key not in self._forced:
            self._forced[key] = self._build_forced(block_size, sink)
        return self._forced[key]

    def token_masks(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(first-frame sink, text) token flags, bool [S] each, in the sparse op's order
        [video tiles | text]; an image layout has no sink."""
        layout = self.layout
        sink = first_frame_mask(layout.grid, text_len=layout.text_len, device=self.device)
        sink = sink[self.sequence_perm] & layout.video
        text = torch.arange(layout.seq_len, device=self.device) >= layout.video_tokens
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


def permute_tokens(
    x: torch.Tensor, index: torch.Tensor, dim: int, in_place: bool = False
) -> torch.Tensor:
    """``x`` gathered along its token dimension ``dim`` by ``index`` [S].

    ``in_place`` writes the result into ``x`` (inference only; with autograd on or under
    torch.compile it stays a copy). For hidden states the transformer's forward still holds
    the tensor it passes to the first block, so a permuted copy would keep a second
    hidden-state tensor alive through that block (96 MiB at Wan2.1-1.3B 480p x 81; measured
    +0.09 GiB forward peak); in place, only a transient gather buffer exists.
    """
    if x.shape[dim] != index.numel():
        raise ValueError(f"a token-ordered tensor of shape {tuple(x.shape)} has {x.shape[dim]} "
                         f"tokens along dim {dim}, the token layout gives {index.numel()}")
    permuted = x.index_select(dim, index)
    if in_place and not (torch.is_grad_enabled() or torch.compiler.is_compiling()):
        return x.copy_(permuted)
    return permuted


def install_permute_points(transformer: nn.Module, adapter, permuter: TokenPermuter,
                           compact: bool = True) -> list:
    """Hooks that set each forward's token layout and permute at the adapter's permute points.

    ``compact`` keeps only the channels a point names (:class:`PermutePoint`); pass False when
    some attention layer keeps the family's own processor, which reads the full tensors.

    A transformer pre-hook computes the layout from the forward's inputs
    (``adapter.token_layout``) and begins ``permuter``. When the permuter is active it also
    permutes the ``model_input`` points (copies: the caller's tensors are never written);
    ``module_input`` points are permuted in place (tensors the transformer's forward made
    itself), ``module_output`` points through a diffusers hook, and ``unpermute_output``
    points are gathered back with the inverse.

    Returns:
        removable handles (``handle.remove()``).
    """
    points = adapter.permute_points(transformer) if permuter.active else []
    if not compact:
        points = [dataclasses.replace(p, channels=None) for p in points]
    permute_model_inputs = _input_permuter(
        transformer.forward, [p for p in points if p.kind == "model_input"], permuter,
        in_place=False)

    def on_model_input(module, args, kwargs):
        permuter.begin(adapter.token_layout(module, args, kwargs), _call_device(args, kwargs))
        return permute_model_inputs(module, args, kwargs)

    handles = [transformer.register_forward_pre_hook(on_model_input, with_kwargs=True)]
    others = sorted((p for p in points if p.kind != "model_input"),
                    key=lambda p: (p.module, p.kind))
    for (path, kind), grouped in groupby(others, key=lambda p: (p.module, p.kind)):
        module, here = transformer.get_submodule(path), list(grouped)
        if kind == "module_input":
            hook = _input_permuter(module.forward, here, permuter, in_place=True)
            handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
        elif kind == "module_output":
            registry = HookRegistry.check_if_exists_or_initialize(module)
            registry.register_hook(_OutputPermuter(here, permuter), PERMUTE_HOOK)
            handles.append(_DiffusersHookHandle(module, PERMUTE_HOOK))
        else:
            handles.append(module.register_forward_hook(_output_unpermuter(here, permuter)))
    return handles


def _call_device(args: tuple, kwargs: dict) -> torch.device:
    return next(x.device for x in (*args, *kwargs.values()) if torch.is_tensor(x))


def _input_permuter(forward, points: list[PermutePoint], permuter: TokenPermuter,
                    in_place: bool):
    """A forward pre-hook (with kwargs) permuting the named arguments of ``points``."""
    arguments = [(ForwardArgument.of(forward, p.index), p.dim) for p in points]

    def hook(module, args, kwargs):
        for argument, dim in arguments:
            x = argument.get(args, kwargs)
            if x is not None and x.ndim > dim:  # a tensor without the token dim stays
                x = permute_tokens(x, permuter.perm, dim, in_place)
                args, kwargs = argument.replace(args, kwargs, x)
        return args, kwargs

    return hook


def _permute_outputs(output, points: list[PermutePoint], index: torch.Tensor):
    """``output`` with each point's tensor (the value itself, or a tuple item) gathered (and
    cut to the point's channels)."""
    for point in points:
        if point.index is None:
            output = _permute_point(output, point, index)
        else:
            i = point.index
            output = (*output[:i], _permute_point(output[i], point, index), *output[i + 1:])
    return output


def _permute_point(x: torch.Tensor, point: PermutePoint, index: torch.Tensor) -> torch.Tensor:
    if point.channels is not None:
        start, step = point.channels
        x = x[..., start::step]  # a view: the gather below makes the compact copy
    return permute_tokens(x, index, point.dim)


def _output_unpermuter(points: list[PermutePoint], permuter: TokenPermuter):
    """A forward hook putting the outputs of ``points`` back in the native token order."""

    def hook(module, args, output):
        return _permute_outputs(output, points, permuter.inverse)

    return hook


class _OutputPermuter(ModelHook):
    """Permutes a module's outputs (rotary tables); a diffusers hook, so it can sit inside
    diffusers' own hooks on the same module."""

    def __init__(self, points: list[PermutePoint], permuter: TokenPermuter):
        super().__init__()
        self.points = points
        self.permuter = permuter

    def post_forward(self, module: nn.Module, output):
        return _permute_outputs(output, self.points, self.permuter.perm)


class _DiffusersHookHandle:
    """``remove()`` for a hook in a module's diffusers HookRegistry."""

    def __init__(self, module: nn.Module, name: str):
        self.module = module
        self.name = name

    def remove(self) -> None:
        self.module._diffusers_hook.remove_hook(self.name, recurse=False)
