"""FlexAttention compiled by inductor for CPU: the flex backend's BlockMask path without a GPU."""

from __future__ import annotations

import shutil

import pytest
import torch

from ditplan.runtime.kernels import masked_attention_reference
from ditplan.runtime.kernels.flex import flex_block_sparse_attention

# fp32 vs the fp64 oracle on randn inputs with D=16: see FP32_ATOL in test_backends.py.
FP32_ATOL = 1e-5


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("g++") is None, reason="inductor's CPU flex needs a C++ compiler")
def test_flex_kernel_compiled_on_cpu_matches_reference_without_recompiling():
    # Inductor's CPU flex template (not the CUDA one) exercises the BlockMask built from the map,
    # the partial tail block (S=200, blocks of 64) and a broadcast batch dimension; new maps
    # must reuse the compiled kernel (the map enters only as BlockMask tensors).
    from torch._dynamo.utils import counters

    q, k, v = (torch.randn(2, 2, 200, 16) for _ in range(3))
    for trial in range(3):
        block_map = (torch.rand(1, 2, 4, 4) < 0.3) | torch.eye(4, dtype=torch.bool)
        out = flex_block_sparse_attention(q, k, v, block_map, block_size=64)
        ref = masked_attention_reference(q.double(), k.double(), v.double(), block_map,
                                         block_size=64)
        assert (out.double() - ref).abs().max() <= FP32_ATOL
        if trial == 0:
            graphs = counters["stats"]["unique_graphs"]
    assert counters["stats"]["unique_graphs"] == graphs


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("g++") is None, reason="inductor's CPU flex needs a C++ compiler")
def test_flex_op_is_one_opaque_node_in_an_outer_compiled_graph():
    # Without autograd, flex runs as the custom op ditplan::flex_block_sparse_attention: an outer
    # torch.compile traces it without a graph break and without inlining flex; outputs equal
    # eager (the same compiled flex kernel runs in both; the projection is fused or not, fp32).
    from torch._dynamo.utils import counters

    q, k, v = (torch.randn(1, 2, 200, 16) for _ in range(3))
    block_map = (torch.rand(1, 2, 4, 4) < 0.4) | torch.eye(4, dtype=torch.bool)

    def layer(x):
        return flex_block_sparse_attention(x * 2.0, k, v, block_map, block_size=64) + 1.0

    counters.clear()
    with torch.no_grad():
        eager = layer(q)
        compiled = torch.compile(layer, fullgraph=True)(q)
    assert not counters["graph_break"]
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("g++") is None, reason="inductor's CPU flex needs a C++ compiler")
def test_flex_key_padding_compiled_on_cpu_matches_reference_without_recompiling():
    # key_valid enters the mask_mod as a captured tensor: new valid lengths each call (odd, on
    # a block edge, at S) reuse the compiled kernel and mask exactly the padding keys.
    from torch._dynamo.utils import counters

    q, k, v = (torch.randn(2, 2, 200, 16) for _ in range(3))
    for trial, valid in enumerate(((200, 131), (64, 199), (77, 200))):
        block_map = (torch.rand(1, 2, 4, 4) < 0.4) | torch.eye(4, dtype=torch.bool)
        key_valid = torch.tensor(valid)
        out = flex_block_sparse_attention(q, k, v, block_map, block_size=64, key_valid=key_valid)
        ref = masked_attention_reference(q.double(), k.double(), v.double(), block_map,
                                         block_size=64, key_valid=key_valid)
        assert (out.double() - ref).abs().max() <= FP32_ATOL
        if trial == 0:
            graphs = counters["stats"]["unique_graphs"]
    assert counters["stats"]["unique_graphs"] == graphs
