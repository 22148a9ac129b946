"""Dropped key blocks estimated from block means: the merge, each path vs the float64 oracle."""

from __future__ import annotations

import math

import pytest
import torch

from ditplan.runtime.kernels import (
    estimate_dropped_blocks,
    masked_attention_reference,
    select_and_attend,
)
from ditplan.runtime.kernels.block_lists import lists_from_map, map_from_lists
from ditplan.runtime.kernels.dense import dense_block_sparse_attention
from ditplan.runtime.kernels.flex import flex_is_available
from ditplan.runtime.kernels.remainder import (
    block_means,
    estimated_attention_reference,
    merge_attention,
    remainder_attention,
)
from ditplan.runtime.kernels.torch_sparse import torch_block_sparse_attention

FP64_ATOL = 1e-12  # float64 against float64: only the summation order differs


def _qkv(shape, dtype=torch.float64, device="cpu", seed=0):
    generator = torch.Generator(device="cpu").manual_seed(seed)
    return [torch.randn(shape, generator=generator, dtype=dtype).to(device) for _ in range(3)]


def _random_map(batch, heads, seq, block_size, density, seed=1):
    generator = torch.Generator().manual_seed(seed)
    nb = math.ceil(seq / block_size)
    block_map = torch.rand(batch, heads, nb, nb, generator=generator) < density
    return block_map | torch.eye(nb, dtype=torch.bool)  # every row keeps its diagonal


def _lse_reference(q, k, block_map, block_size, key_valid=None):
    """float64 log-sum-exp over each query's kept (valid) keys."""
    seq_len = q.shape[2]
    from ditplan.runtime.kernels.reference import expand_block_map, key_padding_mask

    mask = expand_block_map(block_map, seq_len, seq_len, block_size)
    if key_valid is not None:
        mask = mask & key_padding_mask(key_valid, seq_len)
    scores = (q.double() @ k.double().transpose(-1, -2)) / math.sqrt(q.shape[-1])
    return torch.logsumexp(scores.masked_fill(~mask, -math.inf), dim=-1)


@pytest.mark.parametrize("seq,key_valid", [(256, None), (200, None), (256, [150, 256])])
def test_sparse_backends_return_the_kept_keys_log_sum_exp(seq, key_valid):
    q, k, v = _qkv((2, 3, seq, 16))
    block_map = _random_map(2, 3, seq, 64, 0.4)
    valid = None if key_valid is None else torch.tensor(key_valid)
    ref = _lse_reference(q, k, block_map, 64, valid)
    for backend in (torch_block_sparse_attention, dense_block_sparse_attention):
        out, lse = backend(q, k, v, block_map, block_size=64, key_valid=valid, return_lse=True)
        torch.testing.assert_close(lse, ref, rtol=0, atol=FP64_ATOL)
        plain = backend(q, k, v, block_map, block_size=64, key_valid=valid)
        torch.testing.assert_close(out, plain, rtol=0, atol=0)


def test_merging_two_disjoint_key_sets_gives_attention_over_their_union():
    q, k, v = _qkv((1, 2, 192, 16))
    kept = _random_map(1, 2, 192, 64, 0.5)
    out_a, lse_a = torch_block_sparse_attention(q, k, v, kept, block_size=64, return_lse=True)
    # the complement minus the diagonal, which `kept` has: an empty row gives (0, -inf)
    others = ~kept
    out_b, lse_b = torch_block_sparse_attention(q, k, v, others, block_size=64, return_lse=True)
    every = torch.ones_like(kept)
    expected = masked_attention_reference(q, k, v, every, block_size=64)
    torch.testing.assert_close(merge_attention(out_a, lse_a, out_b, lse_b), expected,
                               rtol=0, atol=FP64_ATOL)


def test_a_block_of_equal_keys_and_values_is_estimated_exactly():
    # The estimate replaces a dropped block by its mean key and value with weight n: exact when
    # every key (and value) of the block is the same, so this is dense attention.
    q, k, v = _qkv((1, 2, 256, 16))
    k = k[:, :, ::64].repeat_interleave(64, dim=2)  # [1, 2, 256, 16], constant per block
    v = v[:, :, ::64].repeat_interleave(64, dim=2)
    out, _ = select_and_attend(q, k, v, block_size=64, density=0.3, backend="torch",
                               estimate_dropped=True)
    dense = masked_attention_reference(q, k, v, torch.ones(1, 1, 4, 4, dtype=torch.bool),
                                       block_size=64)
    torch.testing.assert_close(out, dense, rtol=0, atol=FP64_ATOL)
    dropped, _ = select_and_attend(q, k, v, block_size=64, density=0.3, backend="torch")
    assert (dropped - dense).abs().max() > 1e-3  # without the estimate the blocks are missed


@pytest.mark.parametrize("seq,key_valid,selection", [
    (256, None, dict(density=0.3)), (200, None, dict(density=0.5)),
    (256, [150, 256], dict(density=0.4)), (320, None, dict(mass_threshold=0.6)),
    (256, None, dict(density=(0.2, 0.5, 1.0)))])
@pytest.mark.parametrize("backend", ["torch", "dense"])
def test_select_and_attend_with_the_estimate_matches_the_oracle(seq, key_valid, selection,
                                                                  backend):
    q, k, v = _qkv((2, 3, seq, 16))
    valid = None if key_valid is None else torch.tensor(key_valid)
    out, block_map = select_and_attend(q, k, v, block_size=64, backend=backend, key_valid=valid,
                                       estimate_dropped=True, **selection)
    ref = estimated_attention_reference(q, k, v, block_map, block_size=64, key_valid=valid)
    torch.testing.assert_close(out, ref, rtol=0, atol=FP64_ATOL)
    plain, same_map = select_and_attend(q, k, v, block_size=64, backend=backend,
                                        key_valid=valid, **selection)
    assert torch.equal(block_map, same_map)  # the estimate changes no selection
    assert (out - plain).abs().max() > 1e-3


def test_nothing_dropped_means_nothing_estimated():
    q, k, v = _qkv((1, 2, 200, 16))
    every = torch.ones(1, 1, 4, 4, dtype=torch.bool)
    k_mean, v_mean, log_count = block_means(k, v, 64)
    out, lse = remainder_attention(q, k_mean, v_mean, log_count, every, 64)
    assert torch.equal(out, torch.zeros_like(out)) and torch.isneginf(lse).all()
    estimated, _ = select_and_attend(q, k, v, block_size=64, density=1.0, backend="torch",
                                     estimate_dropped=True)
    torch.testing.assert_close(estimated, masked_attention_reference(q, k, v, every,
                                                                    block_size=64),
                               rtol=0, atol=FP64_ATOL)


def test_the_estimate_refuses_a_flag_count_that_is_not_the_head_count():
    q, k, v = _qkv((1, 3, 128, 8))
    block_map = _random_map(1, 3, 128, 64, 0.5)
    out = torch.zeros_like(q)
    lse = torch.full(q.shape[:3], -math.inf, dtype=q.dtype)
    with pytest.raises(ValueError, match="2 flags for 3 heads"):
        estimate_dropped_blocks(q, k, v, block_map, out, lse, block_size=64, heads=[True, False])


def test_block_means_count_only_valid_keys():
    k, v, _ = _qkv((2, 1, 200, 4))
    k_mean, v_mean, log_count = block_means(k, v, 64, torch.tensor([100, 200]))
    assert log_count.shape == (2, 1, 4)
    torch.testing.assert_close(log_count.exp()[:, 0], torch.tensor(
        [[64.0, 36.0, 0.0, 0.0], [64.0, 64.0, 64.0, 8.0]], dtype=torch.float64))
    torch.testing.assert_close(k_mean[0, 0, 1], k[0, 0, 64:100].mean(dim=0))
    torch.testing.assert_close(v_mean[1, 0, 3], v[1, 0, 192:200].mean(dim=0))


def test_remainder_chunks_agree_with_one_pass(monkeypatch):
    from ditplan.runtime.kernels import remainder

    q, k, v = _qkv((2, 2, 320, 8))
    block_map = _random_map(2, 2, 320, 64, 0.3)
    k_mean, v_mean, log_count = block_means(k, v, 64)
    whole = remainder_attention(q, k_mean, v_mean, log_count, block_map, 64)
    monkeypatch.setattr(remainder, "MAX_CHUNK_ELEMENTS", 2 * 2 * 64 * 5 * 2)  # 2 query blocks
    chunked = remainder_attention(q, k_mean, v_mean, log_count, block_map, 64)
    for a, b in zip(whole, chunked, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=FP64_ATOL)


def test_map_from_lists_inverts_lists_from_map():
    block_map = torch.rand(2, 3, 5, 7, generator=torch.Generator().manual_seed(3)) < 0.4
    counts, indices = lists_from_map(block_map)
    assert torch.equal(map_from_lists(counts, indices, 7), block_map)


# bf16 paths on a GPU against the float64 oracle: bf16 inputs (8 bits of mantissa) give
# attention outputs within ~2^-8 of unit-scale values; 2e-2 allows the merge's extra rounding.
BF16_ATOL = 2e-2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("seq,key_valid", [(2048, None), (1000, None), (2048, [1500, 2048])])
@pytest.mark.parametrize("backend", ["flex", "fa4"])
def test_gpu_paths_with_the_estimate_match_the_oracle(seq, key_valid, backend):
    if not flex_is_available(torch.device("cuda")):
        pytest.skip("flex is not available")
    if backend == "fa4" and key_valid is not None:
        pytest.skip("fa4 takes no key padding")
    q, k, v = _qkv((2, 4, seq, 64), dtype=torch.bfloat16, device="cuda")
    valid = None if key_valid is None else torch.tensor(key_valid, device="cuda")
    out, kept = select_and_attend(q, k, v, block_size=128, density=0.25, backend=backend,
                                  key_valid=valid, estimate_dropped=True)
    block_map = kept if kept.dtype == torch.bool else None
    if block_map is None:  # fa4 returned per-row shares: select the same map again
        from ditplan.runtime.kernels import select_blocks

        block_map = select_blocks(q, k, block_size=128, density=0.25)
    ref = estimated_attention_reference(q.double().cpu(), k.double().cpu(), v.double().cpu(),
                                        block_map.cpu(), block_size=128,
                                        key_valid=None if valid is None else valid.cpu())
    assert (out.double().cpu() - ref).abs().max().item() < BF16_ATOL


def _twin(q, k, v, block_map, out, lse, block_size, key_valid=None, heads=None):
    """estimate_dropped_blocks through the PyTorch functions in float64 (the kernel's twin)."""
    k_mean, v_mean, log_count = block_means(k.double(), v.double(), block_size, key_valid)
    rest, rest_lse = remainder_attention(q.double(), k_mean, v_mean, log_count, block_map,
                                         block_size)
    for head, estimates in enumerate(heads or [True] * q.shape[1]):
        if not estimates:
            rest_lse[:, head] = -math.inf
    return merge_attention(out.double(), lse.double(), rest, rest_lse)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("seq,block_size,key_valid,heads,map_shape", [
    (2048, 128, None, None, "full"),
    (1000, 128, None, [True, False, True, True], "full"),  # partial last block, one head off
    (2048, 64, [1500, 2048], None, "full"),  # key padding: padded blocks never estimated
    (1024, 128, None, None, "broadcast"),  # one map for every batch element and head
    (2048, 128, None, None, "empty rows"),  # rows that keep nothing: the estimate alone
])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_triton_estimate_matches_its_pytorch_twin(seq, block_size, key_valid, heads, map_shape,
                                                  dtype):
    from ditplan.runtime.kernels.registry import TRITON_IMPORTABLE

    if not TRITON_IMPORTABLE:
        pytest.skip("triton is not importable")
    q, k, v = _qkv((2, 4, seq, 64), dtype=dtype, device="cuda")
    k = k.transpose(1, 2).contiguous().transpose(1, 2)  # [B, H, S, D] views of [B, S, H, D]
    valid = None if key_valid is None else torch.tensor(key_valid, device="cuda")
    block_map = _random_map(2, 4, seq, block_size, 0.3).cuda()
    if map_shape == "broadcast":
        block_map = block_map[:1, :1]
    lse_ref = _lse_reference(q.double(), k.double(), block_map, block_size, valid)
    out = torch_block_sparse_attention(q.double(), k.double(), v.double(), block_map,
                                       block_size=block_size, key_valid=valid).to(dtype)
    lse = lse_ref.float()
    if map_shape == "empty rows":  # the sparse kernels' result for a row with no kept key
        block_map = block_map.clone()
        block_map[:, :, 3] = False
        rows = slice(3 * block_size, 4 * block_size)
        out[:, :, rows], lse[:, :, rows] = 0, -math.inf
    merged = estimate_dropped_blocks(q, k, v, block_map, out, lse, block_size=block_size,
                                     key_valid=valid, heads=heads)
    ref = _twin(q, k, v, block_map, out, lse, block_size, valid, heads)
    assert merged.dtype == dtype and merged.shape == q.shape
    # bf16 inputs, pooled keys and values rounded to bf16, probabilities to bf16 for the
    # value product: the error of one bf16 attention (~2^-8 relative) on unit-scale values
    assert (merged.double() - ref).abs().max().item() < BF16_ATOL
    if heads is not None:  # a head that does not estimate returns the sparse result exactly
        off = heads.index(False)
        assert torch.equal(merged[:, off], out[:, off])
    assert (merged.double() - out.double()).abs().max().item() > 10 * BF16_ATOL  # it did work


@pytest.mark.parametrize("seq,key_valid", [
    (256, None), (200, None),  # whole blocks; a partial last block
    (256, [150, 256]), (200, [64, 200]), (200, [1, 130]), (256, [256, 255])])  # key padding
def test_float32_block_means_take_the_reduction_path_alike(seq, key_valid):
    k, v, _ = _qkv((2, 2, seq, 8), dtype=torch.float32)
    valid = None if key_valid is None else torch.tensor(key_valid)
    fast = block_means(k, v, 64, valid)  # float32: unpadded block means, padding corrected
    general = block_means(k.double(), v.double(), 64,
                          torch.tensor([seq, seq]) if valid is None else valid)  # masked float64
    for a, b in zip(fast, general, strict=True):
        assert a.dtype == torch.float32
        # float32 sums of 64 unit-scale terms against float64: ~64 * 2^-24 relative
        torch.testing.assert_close(a.double().expand_as(b), b, rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_the_estimate_kernel_runs_inside_a_compiled_graph():
    from ditplan.runtime.kernels.registry import TRITON_IMPORTABLE

    if not TRITON_IMPORTABLE:
        pytest.skip("triton is not importable")
    q, k, v = _qkv((1, 4, 1000, 64), dtype=torch.bfloat16, device="cuda")
    block_map = _random_map(1, 4, 1000, 128, 0.3).cuda()
    out = torch.zeros_like(q)
    lse = torch.full(q.shape[:3], -math.inf, device="cuda")  # nothing kept: the estimate alone

    def estimate(q, k, v, block_map, out, lse):
        return estimate_dropped_blocks(q, k, v, block_map, out, lse, block_size=128)

    eager = estimate(q, k, v, block_map, out, lse)
    compiled = torch.compile(estimate, fullgraph=True)(q, k, v, block_map, out, lse)
    # the compiled graph's block means come from inductor's reduction, not the Triton kernel's
    assert (compiled.double() - eager.double()).abs().max().item() < BF16_ATOL
