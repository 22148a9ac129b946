"""A fine-tuning penalty that concentrates self-attention: each layer's top key-block mass for a
sampled query block per clip, in the runtime's tiled block order, pushed up to a target.

Issue 15's testbed should attend the way large video DiTs do, where the top 20% of key blocks
hold most of a query block's attention. Training the long model on more steps did not move its
top-20% mass (0.70 from step 2,034 to 4,143; BENCHMARKS.md), so a fine-tune may add this
penalty. It measures exactly what ``tools/attention_concentration.py`` reports (the oracle top-n
block mass, n = ceil(density x key blocks), mean over the query block's queries) on one query
block per clip and layer, and adds ``weight x mean(relu(target - mass))`` to the loss, the mass
taken per head or, with ``over="layers"``, its mean over each layer's heads (the statistic the
issue aims at; it leaves a layer free to keep a few diffuse heads). The attention output itself
is the original processor's: the penalty only reads q and k again.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ditplan.runtime.kernels.permute import tile_permutation
from ditplan.runtime.kernels.wan_qk import apply_wan_rotary

# The long workload's block settings (benchmarks/quality, --workload long) and issue 15's density.
BLOCK_SIZE = 128
TILE = (1, 8, 8)
DENSITY = 0.2
PENALISED = ("heads", "layers")  # what the target applies to: each head, or each layer's mean


def top_block_mass(q_rows: torch.Tensor, k: torch.Tensor, *, block_size: int,
                   density: float) -> torch.Tensor:
    """Attention mass on the top-n key blocks of one query block, n = max(1, ceil(density Kb)).

    Args:
        q_rows: [B, Qr, H, D], the query block's queries (after norm and rotary).
        k: [B, S, H, D], every key in block order (block j = tokens j*block_size...).

    Returns:
        [B, H] in (0, 1]: the block's mean attention distribution over key blocks (softmax in
        float32 at scale 1/sqrt(D)), summed over its n largest blocks; differentiable.
    """
    block_mass = key_block_mass(q_rows, k, block_size=block_size)  # [B, H, Kb]
    return block_mass.topk(top_blocks(block_mass.shape[-1], density), dim=-1).values.sum(-1)


def top_blocks(blocks: int, density: float) -> int:
    """n = max(1, ceil(density x blocks)): the key blocks a density keeps."""
    return max(1, math.ceil(density * blocks))


def key_block_mass(q_rows: torch.Tensor, k: torch.Tensor, *, block_size: int) -> torch.Tensor:
    """The query block's mean attention distribution over key blocks.

    Args:
        q_rows: [B, Qr, H, D]; k: [B, S, H, D] in block order (block j = tokens j*block_size...).

    Returns:
        float32 [B, H, Kb], Kb = ceil(S / block_size), each row summing to 1 (softmax in float32
        at scale 1/sqrt(D) over all keys; a partial last block holds its real keys).
    """
    seq = k.shape[1]
    logits = torch.einsum("bqhd,bshd->bhqs", q_rows, k).float() / math.sqrt(q_rows.shape[-1])
    probs = logits.softmax(dim=-1)  # [B, H, Qr, S]
    blocks = math.ceil(seq / block_size)
    if blocks * block_size != seq:  # a partial last block: zeros complete it
        probs = F.pad(probs, (0, blocks * block_size - seq))
    return probs.unflatten(-1, (blocks, block_size)).sum(-1).mean(-2)


def self_attention_qk(attn, hidden_states: torch.Tensor, rotary_emb,
                      rows: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """A Wan self-attention's queries and keys, projected, normalized and rotated as its
    processor does (for the queries of `rows` only: no q for the other tokens).

    Args:
        hidden_states: [B, S, C] in raster order.
        rotary_emb: the (cos, sin) tables, each [1, S, 1, D], or None.
        rows: int64 [B, Qr] token positions, or None for every token.

    Returns:
        q: [B, Qr, H, D] (or [B, S, H, D]), k: [B, S, H, D], raster order.
    """
    picked = hidden_states
    if rows is not None:
        picked = hidden_states.gather(1, rows[..., None].expand(-1, -1, hidden_states.shape[-1]))
    q = attn.norm_q(attn.to_q(picked)).unflatten(2, (attn.heads, -1))
    k = attn.norm_k(attn.to_k(hidden_states)).unflatten(2, (attn.heads, -1))
    if rotary_emb is not None:
        cos, sin = rotary_emb
        if rows is not None:
            cos, sin = cos[0, rows], sin[0, rows]  # the rows' tables: [B, Qr, 1, D]
        q = apply_wan_rotary(q, cos, sin)
        k = apply_wan_rotary(k, *rotary_emb)
    return q, k


@dataclass
class _Sample:
    """This step's query blocks, shared by every layer's probe."""

    query_tokens: torch.Tensor | None = None  # int64 [B, block_size], raster token positions
    key_order: torch.Tensor | None = None  # int64 [S], raster -> tiled (tile_permutation)


class _ConcentrationProbe:
    """Wraps one self-attention's processor: the output is the original's; on calls without
    encoder states (self-attention) it also leaves the layer's top block mass in ``mass``."""

    def __init__(self, original, sample: _Sample, block_size: int, density: float):
        self.original = original
        self.sample = sample
        self.block_size = block_size
        self.density = density
        self.mass: torch.Tensor | None = None  # [B, H] of the last call

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 rotary_emb=None):
        out = self.original(attn, hidden_states, encoder_hidden_states, attention_mask,
                            rotary_emb)
        if encoder_hidden_states is None and self.sample.query_tokens is not None:
            self.mass = self._mass(attn, hidden_states, rotary_emb)
        return out

    def _mass(self, attn, hidden_states: torch.Tensor, rotary_emb) -> torch.Tensor:
        """hidden_states: [B, S, C] in raster order -> [B, H]."""
        q, k = self_attention_qk(attn, hidden_states, rotary_emb, self.sample.query_tokens)
        k = k[:, self.sample.key_order]  # tiled order: key block j is one spatiotemporal block
        return top_block_mass(q, k, block_size=self.block_size, density=self.density)


class ConcentrationPenalty:
    """Installs a probe on every ``blocks.{i}.attn1`` of a WanTransformer3DModel; per step,
    ``sample`` picks one query block per clip, the forward runs, ``penalty`` reads the masses.

    Install before ``torch.compile`` wraps the model (the probes are traced into its graph).
    """

    def __init__(self, transformer: nn.Module, *, target: float, over: str = "heads",
                 block_size: int = BLOCK_SIZE, tile: tuple[int, int, int] = TILE,
                 density: float = DENSITY):
        if not 0 < target <= 1:
            raise ValueError(f"concentration target {target} must be in (0, 1]")
        if over not in PENALISED:
            raise ValueError(f"concentration penalty over {over!r}: choose one of {PENALISED}")
        layers = [block.attn1 for block in transformer.blocks]
        if any(attn.fused_projections for attn in layers):
            raise ValueError("the concentration penalty reads to_q/to_k: unfuse the projections "
                             "(transformer.unfuse_qkv_projections()) before installing it")
        self.target = target
        self.over = over
        self.block_size = block_size
        self.tile = tile
        self._sample = _Sample()
        self._orders: dict[tuple, torch.Tensor] = {}
        self._layers = layers
        self.probes = [_ConcentrationProbe(attn.processor, self._sample, block_size, density)
                       for attn in layers]
        for attn, probe in zip(layers, self.probes, strict=True):
            attn.set_processor(probe)

    def sample(self, grid: tuple[int, int, int], batch: int, generator: torch.Generator,
               take: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        """Picks this step's query block for each of `batch` clips (uniform over the whole blocks
        of the tiled order) on `generator`'s device; grid: (F, H, W) video tokens. `take`, if
        given, keeps this process's clips of the batch (``Shard.take``), so that a data-parallel
        run draws what a single process does.

        Raises:
            ValueError: if the clip has fewer tokens than one block.
        """
        device = generator.device
        key = (grid, device)
        if key not in self._orders:
            self._orders[key] = tile_permutation(grid, self.tile, device=device)
        order = self._orders[key]  # [S]
        whole = order.numel() // self.block_size
        if whole == 0:
            raise ValueError(f"clips of {order.numel()} tokens hold no whole block of "
                             f"{self.block_size}: the concentration penalty needs longer clips")
        first = torch.randint(whole, (batch,), generator=generator, device=device)  # [B]
        offsets = torch.arange(self.block_size, device=device)
        tokens = order[first[:, None] * self.block_size + offsets]  # [B, Qr]
        self._sample.query_tokens = tokens if take is None else take(tokens)
        self._sample.key_order = order

    def masses(self) -> torch.Tensor:
        """[L, B, H]: each layer's top block mass in the last forward after ``sample``.

        Raises:
            RuntimeError: if a layer ran no self-attention since the last ``sample``.
        """
        if any(probe.mass is None for probe in self.probes):
            raise RuntimeError("no forward since ConcentrationPenalty.sample: nothing measured")
        return torch.stack([probe.mass for probe in self.probes])

    def penalty(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(the mean of relu(target - mass) over layers, clips and heads, or over layers and
        clips of each layer's head-mean mass; the mean mass, detached); clears the masses for
        the next step."""
        masses = self.masses()  # [L, B, H]
        for probe in self.probes:
            probe.mass = None
        penalised = masses if self.over == "heads" else masses.mean(-1)
        return F.relu(self.target - penalised).mean(), masses.detach().mean()

    def remove(self) -> None:
        """Puts the original processors back."""
        for attn, probe in zip(self._layers, self.probes, strict=True):
            attn.set_processor(probe.original)
