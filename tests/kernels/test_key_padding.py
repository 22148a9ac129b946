"""Key padding (design D7): every backend masks the keys past key_valid[b] like the float64
masked reference; fa4 refuses padding and auto skips it."""

from __future__ import annotations

import dataclasses
import logging
import math

import pytest
import torch
import torch.nn.functional as F

from ditplan.runtime.kernels import (
    block_sparse_attention,
    forced_blocks,
    masked_attention_reference,
    registry,
    select_and_attend,
)
from ditplan.runtime.kernels.flex import block_mask_from_map

# fp32 vs the fp64 oracle on randn inputs with D=16: see FP32_ATOL in test_backends.py (a
# padding key let through moves outputs by ~1e-1).
FP32_ATOL = 1e-5
FP64_ATOL = 1e-12


def _inputs(shape, dtype=torch.float32, device="cpu"):
    return [torch.randn(shape, dtype=dtype, device=device) for _ in range(3)]


def _random_map(batch, heads, seq, block_size, density=0.4, device="cpu"):
    nb = math.ceil(seq / block_size)
    block_map = torch.rand(batch, heads, nb, nb, device=device) < density
    return block_map | torch.eye(nb, dtype=torch.bool, device=device)


def _max_err(out, ref):
    return (out.double() - ref.double()).abs().max().item()


# Odd lengths, valid lengths that end mid-block, on a block edge, at S, and one batch element
# whose only kept block in some rows is pure padding (the 0-output rule).
CASES = [((2, 3, 301, 16), 64, (301, 187)), ((3, 2, 449, 16), 64, (449, 128, 390)),
         ((2, 2, 333, 16), 128, (200, 333)), ((1, 1, 77, 16), 64, (65,))]


@pytest.mark.parametrize("backend", ["torch", "dense"])
@pytest.mark.parametrize("dtype,atol", [(torch.float32, FP32_ATOL), (torch.float64, FP64_ATOL)])
@pytest.mark.parametrize("shape,block_size,valid", CASES)
@pytest.mark.parametrize("map_batch", [1, "B"])
def test_padded_keys_match_the_masked_reference(device, backend, dtype, atol, shape, block_size,
                                                valid, map_batch):
    q, k, v = _inputs(shape, dtype, device)
    batch = shape[0] if map_batch == "B" else 1
    block_map = _random_map(batch, shape[1], shape[2], block_size, device=device)
    key_valid = torch.tensor(valid, device=device)
    out = block_sparse_attention(q, k, v, block_map, block_size=block_size, backend=backend,
                                 key_valid=key_valid)
    ref = masked_attention_reference(q.double(), k.double(), v.double(), block_map,
                                     block_size=block_size, key_valid=key_valid)
    assert out.shape == q.shape and out.dtype == dtype
    assert torch.isfinite(out).all()
    assert _max_err(out, ref) <= atol


def test_reference_masks_exactly_the_padding_keys():
    """The oracle itself: padding keys changed arbitrarily leave the output alone; with every
    block kept it is SDPA over the valid keys."""
    q, k, v = _inputs((2, 2, 150, 16), torch.float64)
    block_map = torch.ones(1, 1, 3, 3, dtype=torch.bool)
    key_valid = torch.tensor([150, 97])
    out = masked_attention_reference(q, k, v, block_map, block_size=64, key_valid=key_valid)
    k2, v2 = k.clone(), v.clone()
    k2[1, :, 97:], v2[1, :, 97:] = 1e3, -1e3
    again = masked_attention_reference(q, k2, v2, block_map, block_size=64, key_valid=key_valid)
    assert torch.equal(out, again)
    expected = F.scaled_dot_product_attention(q[1:], k[1:, :, :97], v[1:, :, :97])
    torch.testing.assert_close(out[1:], expected, rtol=0, atol=FP64_ATOL)
    with pytest.raises(ValueError, match=r"key_valid must lie in \[1, S=150\]"):
        masked_attention_reference(q, k, v, block_map, block_size=64,
                                   key_valid=torch.tensor([151, 10]))


@pytest.mark.parametrize("backend", ["torch", "dense"])
def test_selection_with_padding_in_forced_text_blocks(backend):
    """select_and_attend as the runtime calls it: text (the last 70 tokens, padded to a per
    element length) forced both ways; the output equals the reference on the same map."""
    q, k, v = _inputs((2, 2, 330, 16))
    text = torch.arange(330) >= 260
    forced = forced_blocks(330, 64, text_tokens=text)
    key_valid = torch.tensor([330, 271])
    out, block_map = select_and_attend(q, k, v, block_size=64, density=0.5, forced=forced,
                                       backend=backend, key_valid=key_valid)
    ref = masked_attention_reference(q.double(), k.double(), v.double(), block_map,
                                     block_size=64, key_valid=key_valid)
    assert _max_err(out, ref) <= FP32_ATOL
    assert block_map[:, :, :, -2:].all() and block_map[:, :, -2:].all()  # text both ways


def test_bad_key_valid_is_refused():
    q, k, v = _inputs((2, 1, 100, 16))
    block_map = _random_map(1, 1, 100, 64)
    for bad, message in ((torch.tensor([1.0, 2.0]), "integer tensor"),
                         (torch.tensor([100]), r"must be \[2\]")):
        with pytest.raises(ValueError, match=message):
            block_sparse_attention(q, k, v, block_map, block_size=64, key_valid=bad)


@pytest.fixture
def fa4_and_flex_everywhere(monkeypatch):
    # Pretend both GPU backends run here, to see what a Hopper machine with fa4 resolves to.
    for backend in (registry.Backend.FA4, registry.Backend.FLEX):
        spec = registry._REGISTRY[backend]
        monkeypatch.setitem(registry._REGISTRY, backend,
                            dataclasses.replace(spec, is_available=lambda device: True))
    monkeypatch.setattr(registry, "_LOGGED", set())


def test_auto_skips_fa4_for_padded_calls_with_one_line(fa4_and_flex_everywhere, caplog):
    cpu = torch.device("cpu")
    with caplog.at_level(logging.INFO, logger=registry.__name__):
        for _ in range(3):
            padded = registry.resolve_backend("auto", cpu, key_padding=True)
    assert registry.resolve_backend("auto", cpu).name is registry.Backend.FA4
    assert padded.name is registry.Backend.FLEX
    assert [r.getMessage() for r in caplog.records] == [
        "block_sparse_attention: backend auto -> flex on cpu (fa4: takes no key padding)"]


def test_fa4_by_name_refuses_padding():
    q, k, v = _inputs((1, 1, 100, 16))
    with pytest.raises(ValueError, match="fa4 backend takes no key padding"):
        block_sparse_attention(q, k, v, _random_map(1, 1, 100, 128), backend="fa4",
                               key_valid=torch.tensor([90]))
    with pytest.raises(ValueError, match="fa4 backend takes no key padding"):
        registry._REGISTRY[registry.Backend.FA4].fn(q, k, v, _random_map(1, 1, 100, 128),
                                                    block_size=128, key_valid=torch.tensor([90]))


@pytest.mark.parametrize("seq,block_size,valid", [(301, 64, (301, 187, 128)), (256, 128, (1, 256,
                                                                                           130))])
def test_flex_block_mask_drops_padding_blocks_and_marks_the_edge_partial(seq, block_size, valid):
    # Runs on CPU: per batch element the BlockMask's dense view is the map cut after the block
    # holding key_valid[b]; that block is PARTIAL unless key_valid[b] is block-aligned.
    block_map = _random_map(1, 2, seq, block_size)
    key_valid = torch.tensor(valid)
    mask = block_mask_from_map(block_map, seq, block_size, key_valid=key_valid)
    nb = math.ceil(seq / block_size)
    assert mask.full_kv_indices.shape == (len(valid), 2, nb, nb)
    for b, limit in enumerate(valid):
        edge, ragged = divmod(limit, block_size)
        used = torch.arange(nb) < edge + (ragged > 0)  # [Kb] blocks holding a valid key
        assert torch.equal(mask.to_dense()[b], block_map[0] & used)
        partial = block_map[0, :, :, edge] if ragged else torch.zeros(2, nb, dtype=torch.bool)
        assert torch.equal(mask.kv_num_blocks[b].bool(), partial)
        tokens = torch.arange(seq)
        assert torch.equal(mask.mask_mod(torch.tensor(b), 0, 0, tokens), tokens < limit)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape,block_size,valid", CASES)
def test_flex_padded_keys_match_the_masked_reference(dtype, shape, block_size, valid):
    q, k, v = _inputs(shape, dtype, "cuda")
    block_map = _random_map(1, shape[1], shape[2], block_size, device="cuda")
    key_valid = torch.tensor(valid, device="cuda")
    out = block_sparse_attention(q, k, v, block_map, block_size=block_size, backend="flex",
                                 key_valid=key_valid)
    ref = masked_attention_reference(q.double(), k.double(), v.double(), block_map,
                                     block_size=block_size, key_valid=key_valid)
    baseline = block_sparse_attention(q, k, v, block_map, block_size=block_size,
                                      backend="dense", key_valid=key_valid).nan_to_num(0.0)
    # (SDPA in the same dtype; a GPU SDPA kernel may give NaN for a row with no valid key)
    # As test_backends' flex test: <= 2x SDPA's own error in this dtype, plus a floor.
    floor = FP32_ATOL if dtype == torch.float32 else 1e-3
    assert torch.isfinite(out).all()
    assert _max_err(out, ref) <= 2 * _max_err(baseline, ref) + floor
