"""Shapes: non-aligned S, S < block, B/H broadcast maps, H=1/many; bad input gets clear errors."""

from __future__ import annotations

import math

import pytest
import torch

from ditplan.runtime.kernels import (
    block_sparse_attention,
    expand_block_map,
    masked_attention_reference,
)

# fp32 backend vs fp64 oracle on randn inputs with D=16: see FP32_ATOL in test_backends.py.
FP32_ATOL = 1e-5


def _map(map_batch, map_heads, seq, block_size, density=0.3):
    nb = math.ceil(seq / block_size)
    return (torch.rand(map_batch, map_heads, nb, nb) < density) | torch.eye(nb, dtype=torch.bool)


@pytest.mark.parametrize("backend", ["torch", "dense"])
@pytest.mark.parametrize("batch,heads,map_batch,map_heads", [
    (1, 1, 1, 1), (2, 3, 2, 3), (2, 3, 1, 1), (2, 3, 1, 3), (2, 3, 2, 1),
])
@pytest.mark.parametrize("seq,block_size", [(40, 64), (64, 64), (100, 128), (129, 128),
                                            (200, 64)])
def test_shapes_match_reference(backend, batch, heads, map_batch, map_heads, seq, block_size):
    q, k, v = (torch.randn(batch, heads, seq, 16) for _ in range(3))
    block_map = _map(map_batch, map_heads, seq, block_size)
    out = block_sparse_attention(q, k, v, block_map, block_size=block_size, backend=backend)
    ref = masked_attention_reference(q.double(), k.double(), v.double(), block_map,
                                     block_size=block_size)
    assert out.shape == (batch, heads, seq, 16)
    assert (out.double() - ref).abs().max() <= FP32_ATOL


def test_broadcast_map_equals_repeated_map():
    q, k, v = (torch.randn(2, 3, 200, 16) for _ in range(3))
    block_map = _map(1, 1, 200, 64)
    shared = block_sparse_attention(q, k, v, block_map, block_size=64, backend="torch")
    repeated = block_sparse_attention(q, k, v, block_map.expand(2, 3, 4, 4).contiguous(),
                                      block_size=64, backend="torch")
    assert torch.equal(shared, repeated)


def test_per_batch_maps_are_used_per_batch():
    q, k, v = (torch.randn(2, 1, 128, 16) for _ in range(3))
    block_map = torch.tensor([[[[True, False], [False, True]]], [[[True, True], [True, True]]]])
    out = block_sparse_attention(q, k, v, block_map, block_size=64, backend="torch")
    diagonal_only = block_sparse_attention(q[:1, :, :64], k[:1, :, :64], v[:1, :, :64],
                                           torch.ones(1, 1, 1, 1, dtype=torch.bool),
                                           block_size=64, backend="torch")
    torch.testing.assert_close(out[:1, :, :64], diagonal_only, rtol=0, atol=1e-6)
    torch.testing.assert_close(out[1:], torch.nn.functional.scaled_dot_product_attention(
        q[1:], k[1:], v[1:]), rtol=0, atol=FP32_ATOL)


def test_expand_block_map_crops_the_tail():
    block_map = torch.tensor([[[[True, False], [False, True]]]])
    mask = expand_block_map(block_map, 70, 70, 64)
    assert mask.shape == (1, 1, 70, 70)
    assert mask[0, 0, :64, :64].all() and mask[0, 0, 64:, 64:].all()
    assert not mask[0, 0, :64, 64:].any() and not mask[0, 0, 64:, :64].any()


def _call(q_shape=(1, 2, 100, 16), map_shape=(1, 2, 2, 2), **kwargs):
    q, k, v = (torch.randn(q_shape) for _ in range(3))
    kwargs.setdefault("block_size", 64)
    block_map = kwargs.pop("block_map", torch.ones(map_shape, dtype=torch.bool))
    return block_sparse_attention(kwargs.pop("q", q), kwargs.pop("k", k), v, block_map, **kwargs)


@pytest.mark.parametrize("kwargs,match", [
    ({"backend": "triton"}, r"unknown attention backend 'triton'; use one of 'auto', 'fa4', "
                            r"'flex', 'torch', 'dense'"),
    ({"block_size": 32}, "use 64 or 128"),
    ({"q": torch.randn(2, 100, 16)}, r"q must be \[B, H, S, D\]"),
    ({"k": torch.randn(1, 2, 90, 16)}, "same"),
    ({"k": torch.randn(1, 2, 100, 16, dtype=torch.float64)}, "dtype"),
    ({"map_shape": (1, 2, 3, 3)}, r"ceil\(S=100 / block_size=64\) = 2"),
    ({"map_shape": (3, 2, 2, 2)}, r"block_map must be \[1 or 1, 2 or 1, 2, 2\]"),
    ({"map_shape": (2, 2)}, "block_map must be"),
    ({"block_map": torch.ones(1, 2, 2, 2)}, "block_map must be a bool tensor"),
])
def test_bad_input_raises_clear_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        _call(**kwargs)


def test_reference_rejects_bad_map():
    q = torch.randn(1, 1, 100, 16)
    with pytest.raises(ValueError, match="block_map must be"):
        masked_attention_reference(q, q, q, torch.ones(1, 1, 1, 1, dtype=torch.bool),
                                   block_size=64)
    with pytest.raises(ValueError, match="block_map must be"):
        expand_block_map(torch.ones(1, 1, 3, 3, dtype=torch.bool), 100, 100, 64)
