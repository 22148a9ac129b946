"""Triton selection kernels (CUDA) against their PyTorch twins and the loop reference.

The twins run on the same CUDA tensors with DITPLAN's Triton selection switched off
(registry.USE_TRITON_SELECTION), so maps and lists compare exactly. Ties: the Triton top-n
breaks them toward the lower block index, as the loop reference does, so tied scores compare
against select_blocks_reference rather than topk.
"""

from __future__ import annotations

import math

import pytest
import torch

from ditplan.runtime.kernels import forced_blocks, registry, select_blocks, select_blocks_reference
from ditplan.runtime.kernels.block_map import block_mean_scores

pytestmark = pytest.mark.gpu


def _twin(fn, monkeypatch):
    # fn() with the PyTorch twins (Triton selection off), then restored
    with monkeypatch.context() as patch:
        patch.setattr(registry, "USE_TRITON_SELECTION", False)
        return fn()


def _forced(kind, seq, block_size):
    if kind == "none":
        return None
    sink = torch.arange(seq, device="cuda") < seq // 5
    text = torch.arange(seq, device="cuda") >= seq - 20 if kind == "sink+text" else None
    return forced_blocks(seq, block_size, sink_tokens=sink, text_tokens=text)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("seq,block_size,dim", [(1000, 64, 64), (4096, 128, 128),
                                                (4000, 128, 128), (300, 128, 80)])
def test_block_means_match_the_torch_twin(dtype, seq, block_size, dim, monkeypatch):
    from ditplan.runtime.kernels.block_map import token_block_means

    # [B, S, H, D] transposed: the strided layout the attention processors hand over
    x = torch.randn(2, seq, 3, dim, device="cuda", dtype=dtype).transpose(1, 2)
    assert registry.triton_selection_applies(x)
    fast = token_block_means(x, block_size)  # float32 [2, 3, nb, dim]
    twin = _twin(lambda: token_block_means(x, block_size), monkeypatch)
    assert fast.dtype == torch.float32 and fast.shape == twin.shape
    # both sum in float32, in different orders: ~1e-7 of |x| ~ 4 per element
    torch.testing.assert_close(fast, twin, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("forced_kind", ["none", "sink", "sink+text"])
@pytest.mark.parametrize("density", [0.05, 0.2, 0.5, 1.0, (0.1, 0.3, 0.6)])
@pytest.mark.parametrize("seq,block_size", [(1000, 64), (4000, 128), (32760 // 4, 128)])
def test_select_blocks_matches_the_reference(seq, block_size, density, forced_kind,
                                             monkeypatch):
    q, k = (torch.randn(2, 3, seq, 64, device="cuda") for _ in range(2))
    kwargs = dict(block_size=block_size, density=density,
                  forced=_forced(forced_kind, seq, block_size))
    fast = select_blocks(q, k, **kwargs)  # bool [2, 3, nb, nb]
    assert torch.equal(fast, select_blocks_reference(q, k, **kwargs))
    assert torch.equal(fast, _twin(lambda: select_blocks(q, k, **kwargs), monkeypatch))


def test_tied_scores_keep_the_lower_block_index():
    q, k = (torch.randn(1, 2, 1024, 64, device="cuda") for _ in range(2))
    scores = block_mean_scores(q, k, block_size=64)
    tied = (scores * 4).round() / 4  # few distinct values: many ties per row
    forced = _forced("sink", 1024, 64)
    fast = select_blocks(q, k, block_size=64, density=0.3, forced=forced, scores=tied)
    ref = select_blocks_reference(q, k, block_size=64, density=0.3, forced=forced, scores=tied)
    assert torch.equal(fast, ref)


def test_negative_scores_rank_like_floats():
    # Raw logits (negative and positive) must rank as floats do: the kernel's integer keys flip
    # negative floats' bits.
    q, k = (torch.randn(1, 2, 2048, 64, device="cuda") for _ in range(2))
    logits = torch.randn(1, 2, 16, 16, device="cuda") * 3
    fast = select_blocks(q, k, block_size=128, density=0.25, scores=logits)
    ref = select_blocks_reference(q, k, block_size=128, density=0.25, scores=logits)
    assert torch.equal(fast, ref)


@pytest.mark.parametrize("seq,block_size,lead", [(1000, 64, (2, 3)), (1024, 64, (1, 3)),
                                                  (32760, 128, (1, 1)), (4100, 128, (2, 1))])
def test_block_mask_lists_match_the_torch_twin(seq, block_size, lead, monkeypatch):
    from ditplan.runtime.kernels.flex import block_mask_from_map

    nb = math.ceil(seq / block_size)
    block_map = torch.rand(*lead, nb, nb, device="cuda") < 0.3
    block_map[..., 0, :] = False  # an empty row
    block_map[..., 1, :] = True  # a full row
    fast = block_mask_from_map(block_map, seq, block_size)
    twin = _twin(lambda: block_mask_from_map(block_map, seq, block_size), monkeypatch)
    for name in ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices"):
        assert torch.equal(getattr(fast, name), getattr(twin, name)), name
    assert torch.equal(fast.to_dense(), block_map)
