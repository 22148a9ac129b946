"""A CPU estimate of a reference model's top key-block attention mass under several tile shapes."""

from __future__ import annotations

import statistics
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from ditplan.reference.concentration import key_block_mass, self_attention_qk, top_blocks
from ditplan.reference.flow import NUM_TRAIN_TIMESTEPS, noisy_sample
from ditplan.runtime.kernels.block_map import token_block_means
from ditplan.runtime.kernels.permute import tile_permutation

Tile = tuple[int, int, int]
CONCENTRATED, DIFFUSE = 0.9, 0.5  # a head's mass at or above / at or below: the summary's shares


def tile_name(tile: Tile) -> str:
    return "x".join(map(str, tile))


@dataclass(frozen=True)
class TileConcentration:
    """Attention mass on n = ceil(density x key blocks) key blocks per tile, noise level, layer
    and head, the mean over the drawn query blocks and the clips: on the top-n blocks (oracle)
    and on the n blocks that block-mean scores rank first (predicted, what the runtime keeps)."""

    sigmas: tuple[float, ...]
    density: float
    block_size: int
    query_blocks: int  # drawn per tile, noise level and layer
    masses: dict[Tile, torch.Tensor]  # oracle: tile -> [len(sigmas), L, H]
    predicted: dict[Tile, torch.Tensor]  # block-mean selected: tile -> [len(sigmas), L, H]

    def summary(self) -> dict[str, dict[str, float]]:
        """Per tile: the median and minimum over (noise level, layer) of the layer's head mean
        (oracle), the predicted median, and the shares of (noise level, layer, head) cells that
        are concentrated or diffuse (oracle)."""
        out = {}
        for tile, mass in self.masses.items():
            layer_means = mass.mean(-1).flatten().tolist()
            heads = mass.flatten()
            out[tile_name(tile)] = {
                "median": statistics.median(layer_means), "min": min(layer_means),
                "predicted_median": statistics.median(
                    self.predicted[tile].mean(-1).flatten().tolist()),
                "heads_concentrated": (heads >= CONCENTRATED).float().mean().item(),
                "heads_diffuse": (heads <= DIFFUSE).float().mean().item()}
        return out

    def markdown(self) -> str:
        """The summary as a table, then each layer's head mean (over noise levels) per tile."""
        lines = [f"| tile | median over layers and noise levels | min | predicted median | "
                 f"heads >= {CONCENTRATED} | heads <= {DIFFUSE} |", "|---|---|---|---|---|---|"]
        for name, row in self.summary().items():
            lines.append(f"| {name} | {row['median']:.3f} | {row['min']:.3f} | "
                         f"{row['predicted_median']:.3f} | {row['heads_concentrated']:.2f} | "
                         f"{row['heads_diffuse']:.2f} |")
        names = [tile_name(tile) for tile in self.masses]
        lines += ["", "| layer | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
        per_layer = torch.stack([mass.mean((0, 2)) for mass in self.masses.values()])  # [T, L]
        for layer in range(per_layer.shape[1]):
            cells = " | ".join(f"{value:.3f}" for value in per_layer[:, layer].tolist())
            lines.append(f"| blocks.{layer} | {cells} |")
        return "\n".join(lines)

    def as_dict(self) -> dict:
        return {"sigmas": list(self.sigmas), "density": self.density,
                "block_size": self.block_size, "query_blocks": self.query_blocks,
                "summary": self.summary(),
                "masses": {tile_name(tile): mass.tolist() for tile, mass in self.masses.items()},
                "predicted": {tile_name(tile): mass.tolist()
                              for tile, mass in self.predicted.items()}}


class _InputCapture:
    """Wraps a self-attention processor: the output is the original's; it keeps the inputs of
    the last call without encoder states (self-attention)."""

    def __init__(self, original):
        self.original = original
        self.inputs: tuple[torch.Tensor, object] | None = None  # ([B, S, C], rotary tables)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 rotary_emb=None):
        if encoder_hidden_states is None:
            self.inputs = (hidden_states, rotary_emb)
        return self.original(attn, hidden_states, encoder_hidden_states, attention_mask,
                             rotary_emb)


def query_block_mass(q: torch.Tensor, k: torch.Tensor, order: torch.Tensor,
                     firsts: Iterable[int], *, block_size: int,
                     density: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean mass of the query blocks `firsts` of the tiled order on their top-n key blocks and
    on the n blocks their block-mean scores rank first (the runtime's selection).

    Args:
        q, k: [B, S, H, D] in raster order.
        order: int64 [S], raster -> tiled (``tile_permutation``); block j is order[j*bs:(j+1)*bs].
        firsts: block indices.

    Returns:
        (oracle, predicted), each [H]: the mean over the blocks and the clips.
    """
    keys = k[:, order]  # [B, S, H, D] tiled
    key_means = token_block_means(keys.transpose(1, 2), block_size)  # [B, H, Kb, D] float32
    n = top_blocks(key_means.shape[-2], density)
    oracle, predicted = [], []
    for j in firsts:
        rows = q[:, order[j * block_size:(j + 1) * block_size]]  # [B, Qr, H, D]
        block_mass = key_block_mass(rows, keys, block_size=block_size)  # [B, H, Kb]
        scores = torch.einsum("bhd,bhkd->bhk", rows.mean(1, dtype=torch.float32),
                              key_means)  # [B, H, Kb]
        oracle.append(block_mass.topk(n, dim=-1).values.sum(-1))  # [B, H]
        predicted.append(block_mass.gather(-1, scores.topk(n, dim=-1).indices).sum(-1))
    return torch.stack(oracle).mean((0, 1)), torch.stack(predicted).mean((0, 1))


@torch.no_grad()
def estimate_tile_concentration(
    transformer: nn.Module, embeds: torch.Tensor, x0: torch.Tensor, grid: Tile, *,
    tiles: Iterable[Tile], sigmas: Iterable[float], query_blocks: int = 24, seed: int = 0,
    block_size: int = 128, density: float = 0.2, progress: bool = False,
) -> TileConcentration:
    """Runs the transformer once per noise level on x0 noised as in training, and measures every
    self-attention layer's top-block mass for each tile.

    ``ditplan profile --no-sink`` and ``tools/attention_concentration.py`` measure the same
    statistic on a GPU along a sampling trajectory, for the one tile the trace was recorded with.
    This needs no GPU (a 32,768-token forward of the long model takes ~3 minutes on two CPU
    cores) and compares tiles from the same forward: the tile orders the keys into blocks, so it
    changes what a top-n selection can keep. Noisy training clips stand in for the sampler's
    states at the same noise level (on the long models the medians agreed within 0.012).

    Args:
        transformer: a WanTransformer3DModel (its processors are put back afterwards).
        embeds: [B, L, text_dim] caption embeddings.
        x0: [B, C, F, H, W] clean clips.
        grid: (F, H, W) video tokens of x0 after the patch.
        query_blocks: blocks drawn per tile, noise level and layer (all whole blocks if fewer).

    Raises:
        ValueError: on a noise level outside (0, 1], no tile, or clips shorter than one block.
    """
    tiles, sigmas = [tuple(tile) for tile in tiles], tuple(float(s) for s in sigmas)
    if not tiles:
        raise ValueError("no tile to measure")
    if not sigmas or not all(0 < s <= 1 for s in sigmas):
        raise ValueError(f"noise levels must be in (0, 1], got {sigmas}")
    whole = grid[0] * grid[1] * grid[2] // block_size
    if whole == 0:
        raise ValueError(f"clips of {grid} tokens hold no whole block of {block_size}")
    orders = {tile: tile_permutation(grid, tile, device=x0.device) for tile in tiles}
    draw = torch.Generator().manual_seed(seed)
    layers = [block.attn1 for block in transformer.blocks]
    captures = [_InputCapture(attn.processor) for attn in layers]
    masses = {tile: torch.empty(len(sigmas), len(layers), layers[0].heads) for tile in tiles}
    predicted = {tile: torch.empty_like(mass) for tile, mass in masses.items()}
    try:
        for attn, capture in zip(layers, captures, strict=True):
            attn.set_processor(capture)
        for i, sigma in enumerate(tqdm(sigmas, desc="noise levels", disable=not progress)):
            noise = torch.randn(x0.shape, generator=draw).to(x0)  # [B, C, F, H, W]
            sigma_b = torch.full((x0.shape[0],), sigma, device=x0.device)
            transformer(hidden_states=noisy_sample(x0, noise, sigma_b),
                        timestep=sigma_b * NUM_TRAIN_TIMESTEPS, encoder_hidden_states=embeds,
                        return_dict=False)
            for layer, (attn, capture) in enumerate(zip(layers, captures, strict=True)):
                q, k = (x.float() for x in self_attention_qk(attn, *capture.inputs))  # [B,S,H,D]
                capture.inputs = None
                for tile, order in orders.items():
                    firsts = (range(whole) if query_blocks >= whole
                              else torch.randperm(whole, generator=draw)[:query_blocks].tolist())
                    masses[tile][i, layer], predicted[tile][i, layer] = query_block_mass(
                        q, k, order, firsts, block_size=block_size, density=density)
    finally:
        for attn, capture in zip(layers, captures, strict=True):
            attn.set_processor(capture.original)
    return TileConcentration(sigmas=sigmas, density=density, block_size=block_size,
                             query_blocks=min(query_blocks, whole), masses=masses,
                             predicted=predicted)
