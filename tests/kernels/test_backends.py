"""Each backend vs masked dense attention in float64 with the same block map; flex on GPU."""

from __future__ import annotations

import logging
import math

import pytest
import torch
import torch.nn.functional as F

from ditplan.runtime.kernels import (
    block_sparse_attention,
    masked_attention_reference,
    registry,
    select_blocks,
)
from ditplan.runtime.kernels.flex import block_mask_from_map
from ditplan.runtime.kernels.torch_sparse import torch_block_sparse_attention

# fp32 vs the fp64 oracle on unit-scale inputs (randn, D=16, S <= 600): both paths accumulate
# dot products and softmax sums of a few hundred terms in fp32, so errors are ~1e-7..1e-6
# (observed <= 7e-7). 1e-5 leaves >10x margin; a wrong block, a missed tail mask or a wrong
# scale moves outputs by ~1e-1.
FP32_ATOL = 1e-5
FP64_ATOL = 1e-12  # fp64 vs fp64: only summation order differs


def _inputs(shape, dtype=torch.float32, device="cpu"):
    return [torch.randn(shape, dtype=dtype, device=device) for _ in range(3)]


def _random_map(batch, heads, seq, block_size, density=0.3, device="cpu"):
    nb = math.ceil(seq / block_size)
    block_map = torch.rand(batch, heads, nb, nb, device=device) < density
    return block_map | torch.eye(nb, dtype=torch.bool, device=device)  # no empty rows


def _max_err(out, ref):
    return (out.double() - ref.double()).abs().max().item()


@pytest.mark.parametrize("backend", ["torch", "dense"])
@pytest.mark.parametrize("dtype,atol", [(torch.float32, FP32_ATOL), (torch.float64, FP64_ATOL)])
@pytest.mark.parametrize("shape,block_size", [((2, 3, 300, 16), 64), ((1, 2, 600, 16), 128),
                                              ((1, 1, 100, 16), 128)])
def test_backend_matches_masked_reference(device, backend, dtype, atol, shape, block_size):
    q, k, v = _inputs(shape, dtype, device)
    block_map = _random_map(shape[0], shape[1], shape[2], block_size, device=device)
    out = block_sparse_attention(q, k, v, block_map, block_size=block_size, backend=backend)
    ref = masked_attention_reference(q.double(), k.double(), v.double(), block_map,
                                     block_size=block_size)
    assert out.shape == q.shape and out.dtype == dtype
    assert _max_err(out, ref) <= atol


@pytest.mark.parametrize("backend", ["torch", "dense"])
def test_bf16_within_sdpa_error(device, backend):
    # flash-attn rule: error vs the fp64 oracle at most 2x what SDPA in the same dtype makes,
    # plus a floor of 1e-3 (bf16 output rounding is ~4e-3 relative).
    q, k, v = _inputs((1, 2, 300, 16), torch.bfloat16, device)
    block_map = _random_map(1, 2, 300, 64, device=device)
    ref = masked_attention_reference(q.double(), k.double(), v.double(), block_map, block_size=64)
    baseline = F.scaled_dot_product_attention(
        q, k, v, attn_mask=block_map.repeat_interleave(64, -1).repeat_interleave(64, -2)[
            ..., :300, :300])
    out = block_sparse_attention(q, k, v, block_map, block_size=64, backend=backend)
    assert out.dtype == torch.bfloat16
    assert _max_err(out, ref) <= 2 * _max_err(baseline, ref) + 1e-3


@pytest.mark.parametrize("backend", ["torch", "dense"])
@pytest.mark.parametrize("seq,block_size", [(300, 64), (256, 128)])
def test_density_one_equals_sdpa(device, backend, seq, block_size):
    q, k, v = _inputs((2, 3, seq, 16), device=device)
    block_map = select_blocks(q, k, block_size=block_size, density=1.0)
    out = block_sparse_attention(q, k, v, block_map, block_size=block_size, backend=backend)
    expected = F.scaled_dot_product_attention(q, k, v)
    if backend == "dense" and device == "cpu":
        assert torch.equal(out, expected)  # an all-True mask takes the same CPU kernel
    else:
        torch.testing.assert_close(out, expected, rtol=0, atol=FP32_ATOL)


def test_torch_backend_chunking_does_not_change_results():
    # Rows of very different widths (dense sink rows + sparse rows) and any chunk size give the
    # same numbers up to fp32 summation order (a chunk pads rows to its widest row with masked
    # keys, and matmul blocking depends on the batch size), so 1e-6, not bitwise.
    q, k, v = _inputs((2, 2, 520, 16))
    block_map = _random_map(2, 2, 520, 64, density=0.2)
    block_map[:, :, 0] = True  # a dense (sink) row
    block_map[1, 0, 3] = False  # and an empty row: zeros
    full = torch_block_sparse_attention(q, k, v, block_map, block_size=64)
    for chunk in (1, 64 * 160 * 3, 2**40):
        out = torch_block_sparse_attention(q, k, v, block_map, block_size=64,
                                           max_chunk_elements=chunk)
        torch.testing.assert_close(out, full, rtol=0, atol=1e-6)
    ref = masked_attention_reference(q.double(), k.double(), v.double(), block_map, block_size=64)
    assert _max_err(full, ref) <= FP32_ATOL
    assert (full[1, 0, 3 * 64 : 4 * 64] == 0).all()


@pytest.mark.parametrize("backend", ["torch", "dense"])
def test_empty_rows_give_zeros(device, backend):
    q, k, v = _inputs((1, 1, 200, 16), device=device)
    block_map = _random_map(1, 1, 200, 64, device=device)
    block_map[0, 0, 2] = False
    out = block_sparse_attention(q, k, v, block_map, block_size=64, backend=backend)
    assert (out[0, 0, 128:192] == 0).all() and out[0, 0, :128].abs().sum() > 0


def test_custom_scale(device):
    q, k, v = _inputs((1, 2, 150, 16), device=device)
    block_map = _random_map(1, 2, 150, 64, device=device)
    ref = masked_attention_reference(q.double(), k.double(), v.double(), block_map, block_size=64,
                                     scale=0.05)
    for backend in ("torch", "dense"):
        out = block_sparse_attention(q, k, v, block_map, block_size=64, scale=0.05,
                                     backend=backend)
        assert _max_err(out, ref) <= FP32_ATOL


def test_auto_picks_torch_on_cpu_and_logs_once(monkeypatch, caplog):
    monkeypatch.setattr(registry, "_LOGGED", set())
    q, k, v = _inputs((1, 1, 64, 16))
    block_map = _random_map(1, 1, 64, 64)
    with caplog.at_level(logging.INFO, logger=registry.__name__):
        for _ in range(3):
            out = block_sparse_attention(q, k, v, block_map, block_size=64)
    assert registry.resolve_backend("auto", q.device).name is registry.Backend.TORCH
    assert [r.getMessage() for r in caplog.records] == [
        "block_sparse_attention: backend auto -> torch on cpu"]
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v), rtol=0,
                               atol=FP32_ATOL)


def test_unavailable_backend_falls_back_to_torch_with_one_warning(monkeypatch, caplog):
    monkeypatch.setattr(registry, "_LOGGED", set())
    q, k, v = _inputs((1, 2, 130, 16))  # CPU tensors: flex is never available for them
    block_map = _random_map(1, 2, 130, 64)
    with caplog.at_level(logging.INFO, logger=registry.__name__):
        outs = [block_sparse_attention(q, k, v, block_map, block_size=64, backend="flex")
                for _ in range(2)]
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "falling back to 'torch'" in warnings[0].getMessage()
    assert torch.equal(outs[0], torch_block_sparse_attention(q, k, v, block_map, block_size=64))


@pytest.mark.parametrize("seq,block_size,map_batch", [(300, 64, 1), (300, 64, 2), (256, 128, 2)])
def test_flex_block_mask_covers_exactly_the_map(seq, block_size, map_batch):
    # Runs on CPU: the BlockMask's dense view must be the map itself, with full-width indices.
    block_map = _random_map(map_batch, 3, seq, block_size)
    mask = block_mask_from_map(block_map, seq, block_size)
    nb = math.ceil(seq / block_size)
    assert mask.full_kv_indices.shape == (map_batch, 3, nb, nb)
    assert mask.full_kv_indices.dtype == torch.int32
    # Only kept blocks of a partial last key column are PARTIAL (mask_mod kv_idx < S).
    partial = block_map[..., -1] if seq % block_size else torch.zeros_like(block_map[..., -1])
    assert torch.equal(mask.kv_num_blocks.bool(), partial)
    assert mask.seq_lengths == (seq, seq)
    assert torch.equal(mask.to_dense(), block_map)


def test_kv_blocks_list_each_rows_kept_blocks_first_in_ascending_order():
    from ditplan.runtime.kernels.block_lists import lists_from_map

    block_map = _random_map(2, 3, 640, 64)  # [2, 3, 10, 10]
    block_map[0, 0, 0] = False  # an empty row
    block_map[0, 0, 1] = True  # a full row
    counts, indices = lists_from_map(block_map)
    assert counts.dtype == indices.dtype == torch.int32 and indices.shape == block_map.shape
    for row, count, listed in zip(block_map.flatten(0, 2), counts.flatten(), indices.flatten(0, 2),
                                  strict=True):
        assert listed[:count].tolist() == row.nonzero().flatten().tolist()


def test_block_mask_and_dispatch_trace_without_graph_breaks():
    # Under an outer torch.compile (the lead compiles the whole transformer) building the
    # BlockMask and resolving the backend must not break the graph.
    block_map = _random_map(1, 3, 300, 64)
    build = torch.compile(lambda m: block_mask_from_map(m, 300, 64).full_kv_indices,
                          fullgraph=True, backend="eager")
    assert torch.equal(build(block_map), block_mask_from_map(block_map, 300, 64).full_kv_indices)
    def scaled_by_choice(x):
        return x * (registry.resolve_backend("auto", x.device).name == "torch")

    resolve = torch.compile(scaled_by_choice, fullgraph=True, backend="eager")
    assert torch.equal(resolve(torch.ones(2)), torch.ones(2))


# ---------------------------------------------------------------- GPU (FlexAttention) -------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape,block_size,map_batch", [
    ((1, 2, 1024, 64), 128, 1), ((2, 3, 1000, 64), 128, 2), ((2, 3, 1000, 64), 128, 1),
    ((1, 2, 448, 64), 64, 1), ((1, 1, 100, 64), 128, 1), ((1, 2, 100, 64), 64, 1),
    ((1, 2, 40, 64), 64, 1), ((1, 2, 4100, 128), 128, 1),
])
def test_flex_matches_masked_reference(dtype, shape, block_size, map_batch):
    q, k, v = _inputs(shape, dtype, "cuda")
    block_map = _random_map(map_batch, shape[1], shape[2], block_size, device="cuda")
    out = block_sparse_attention(q, k, v, block_map, block_size=block_size, backend="flex")
    ref = masked_attention_reference(q.double(), k.double(), v.double(), block_map,
                                     block_size=block_size)
    expanded = block_map.repeat_interleave(block_size, -1).repeat_interleave(block_size, -2)
    baseline = F.scaled_dot_product_attention(
        q, k, v, attn_mask=expanded[..., : shape[2], : shape[2]])
    # Same rule as the CPU bf16 test: <= 2x SDPA's own error in this dtype, plus a floor
    # (1e-5 for fp32, as above; 1e-3 for bf16 output rounding).
    floor = FP32_ATOL if dtype == torch.float32 else 1e-3
    assert _max_err(out, ref) <= 2 * _max_err(baseline, ref) + floor


@pytest.mark.gpu
def test_flex_does_not_recompile_across_block_maps():
    from torch._dynamo.utils import counters

    q, k, v = _inputs((1, 4, 1000, 64), torch.bfloat16, "cuda")
    block_sparse_attention(q, k, v, _random_map(1, 4, 1000, 128, device="cuda"), backend="flex")
    graphs, frames = counters["stats"]["unique_graphs"], counters["stats"]["calls_captured"]
    for density in (0.1, 0.5, 0.9):
        block_map = _random_map(1, 4, 1000, 128, density=density, device="cuda")
        out = block_sparse_attention(q, k, v, block_map, backend="flex")
        ref = masked_attention_reference(q.double(), k.double(), v.double(), block_map,
                                         block_size=128)
        assert _max_err(out, ref) <= 2e-2  # bf16 sanity: a recompile-free wrong map is ~1e-1
    assert counters["stats"]["unique_graphs"] == graphs
    assert counters["stats"]["calls_captured"] == frames


@pytest.mark.gpu
def test_auto_picks_flex_on_cuda_unless_fa4_runs():
    fa4 = registry._REGISTRY[registry.Backend.FA4].is_available(torch.device("cuda"))
    expected = registry.Backend.FA4 if fa4 else registry.Backend.FLEX
    assert registry.resolve_backend("auto", torch.device("cuda")).name is expected


@pytest.mark.gpu
def test_flex_density_one_close_to_sdpa():
    q, k, v = _inputs((1, 4, 2048, 128), torch.bfloat16, "cuda")
    block_map = torch.ones(1, 1, 16, 16, dtype=torch.bool, device="cuda")
    out = block_sparse_attention(q, k, v, block_map, backend="flex")
    expected = F.scaled_dot_product_attention(q, k, v)
    rel = (out.float() - expected.float()).norm() / expected.float().norm()
    assert rel < 1e-2  # two bf16 kernels with different tiling: ~3e-3 relative
