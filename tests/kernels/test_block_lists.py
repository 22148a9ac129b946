"""Kept-block lists straight from top-k against the boolean-map twin (CPU in CI; Triton on GPU)."""

from __future__ import annotations

import math

import pytest
import torch

from ditplan.runtime.kernels import (
    block_sparse_attention,
    forced_blocks,
    lists_from_map,
    registry,
    select_and_attend,
    select_block_lists,
    select_blocks,
)
from ditplan.runtime.kernels.block_lists import block_logits


def _qk(batch, heads, seq, dim=16):
    return torch.randn(batch, heads, seq, dim), torch.randn(batch, heads, seq, dim)


def _forced(seq, block_size, *, sink_tokens=0, diagonal=True):
    sink = torch.zeros(seq, dtype=torch.bool)
    sink[:sink_tokens] = True
    return forced_blocks(seq, block_size, sink_tokens=sink if sink_tokens else None,
                         diagonal=diagonal)


def _assert_lists_are_map(counts, indices, block_map):
    # counts [B, H, Qb], indices [B, H, Qb, W] vs bool [B, H, Qb, Kb]: same kept set, ascending,
    # zeros after each row's count.
    assert counts.dtype == indices.dtype == torch.int32
    assert torch.equal(counts, block_map.sum(-1, dtype=torch.int32))
    for row, count, listed in zip(block_map.flatten(0, 2), counts.flatten(),
                                  indices.flatten(0, 2), strict=True):
        assert listed[:count].tolist() == row.nonzero().flatten().tolist()
        assert not listed[count:].any()


CASES = [  # (batch, heads, seq, block_size, density, sink tokens, diagonal)
    (1, 2, 1000, 128, 0.2, 0, True),  # partial last block, diagonal only
    (2, 3, 640, 64, 0.3, 70, True),  # forced sink rows and columns spanning two blocks
    (1, 3, 900, 64, [0.1, 0.4, 1.0], 64, True),  # per-head budgets, one head dense
    (1, 2, 1300, 64, 0.05, 300, True),  # forced columns outnumber the row budget
    (2, 2, 300, 64, 0.5, 0, False),  # nothing forced
]


@pytest.mark.parametrize("batch,heads,seq,block_size,density,sink,diagonal", CASES)
def test_lists_from_top_k_equal_the_boolean_map(batch, heads, seq, block_size, density, sink,
                                                 diagonal):
    q, k = _qk(batch, heads, seq)
    forced = _forced(seq, block_size, sink_tokens=sink, diagonal=diagonal)
    scores = block_logits(q, k, block_size)  # distinct scores: both sides rank alike
    block_map = select_blocks(q, k, block_size=block_size, density=density, forced=forced,
                              scores=scores)
    counts, indices = select_block_lists(q, k, block_size=block_size, density=density,
                                         forced=forced, scores=scores)
    _assert_lists_are_map(counts, indices, block_map)
    nb = math.ceil(seq / block_size)
    assert indices.shape[-1] == (nb if sink else counts.max().item())


def test_default_scores_rank_like_the_softmax_scores():
    q, k = _qk(1, 2, 2000)
    forced = _forced(2000, 128, sink_tokens=200)
    counts, indices = select_block_lists(q, k, block_size=128, density=0.25, forced=forced)
    block_map = select_blocks(q, k, block_size=128, density=0.25, forced=forced)
    _assert_lists_are_map(counts, indices, block_map)


def test_a_kept_partial_last_block_is_last_in_its_list():
    # The fa4 kernel masks the sequence tail only in the last listed block (see fa4.py).
    q, k = _qk(1, 4, 1000)  # 8 blocks, the last one 104 tokens
    k[..., -40:, :] *= 30  # make the tail block attractive to every row
    counts, indices = select_block_lists(q, k, block_size=128, density=0.4,
                                         forced=_forced(1000, 128))
    rows = indices.flatten(0, 2)
    last = rows[torch.arange(rows.shape[0]), counts.flatten() - 1]
    assert (rows == 7).any(-1).sum() > 0 and ((rows == 7).any(-1) <= (last == 7)).all()


def test_lists_from_map_broadcast_map_and_empty_rows():
    block_map = torch.rand(1, 1, 9, 9) < 0.4
    block_map[0, 0, 3] = False  # an empty row
    block_map[0, 0, 5] = True  # a full row
    counts, indices = lists_from_map(block_map.expand(2, 3, 9, 9))
    _assert_lists_are_map(counts, indices, block_map.expand(2, 3, 9, 9))


@pytest.mark.parametrize("density,mass", [(0.3, None), (None, 0.8)])
def test_select_and_attend_off_fa4_is_select_then_attend(density, mass):
    q, k = _qk(1, 2, 700)
    v = torch.randn_like(q)
    forced = _forced(700, 64, sink_tokens=64)
    out, kept = select_and_attend(q, k, v, block_size=64, density=density, mass_threshold=mass,
                                  forced=forced, backend="torch")
    block_map = select_blocks(q, k, block_size=64, density=density, mass_threshold=mass,
                              forced=forced)
    assert torch.equal(kept, block_map)
    assert torch.equal(out, block_sparse_attention(q, k, v, block_map, block_size=64,
                                                   backend="torch"))


def test_list_selection_traces_without_graph_breaks():
    q, k = _qk(1, 2, 1000)
    forced = _forced(1000, 128, sink_tokens=128)

    def lists(q, k):
        return select_block_lists(q, k, block_size=128, density=0.3, forced=forced)

    compiled = torch.compile(lists, fullgraph=True, backend="eager")
    for got, expected in zip(compiled(q, k), lists(q, k), strict=True):
        assert torch.equal(got, expected)


@pytest.mark.gpu
@pytest.mark.parametrize("sink", [0, 300])
def test_triton_lists_equal_their_twin(monkeypatch, sink):
    q, k = (torch.randn(2, 3, 4099, 128, dtype=torch.bfloat16, device="cuda") for _ in range(2))
    sink_tokens = torch.zeros(4099, dtype=torch.bool, device="cuda")
    sink_tokens[:sink] = True
    forced = forced_blocks(4099, 128, sink_tokens=sink_tokens if sink else None, device="cuda")
    scores = block_logits(q, k, 128)
    for density in (0.2, [0.05, 0.5, 1.0]):
        fast = select_block_lists(q, k, density=density, forced=forced, scores=scores)
        monkeypatch.setattr(registry, "USE_TRITON_SELECTION", False)
        twin = select_block_lists(q, k, density=density, forced=forced, scores=scores)
        monkeypatch.setattr(registry, "USE_TRITON_SELECTION", True)
        assert torch.equal(fast[0], twin[0]) and torch.equal(fast[1], twin[1])
        block_map = select_blocks(q, k, density=density, forced=forced, scores=scores)
        _assert_lists_are_map(fast[0].cpu(), fast[1].cpu(), block_map.cpu())
