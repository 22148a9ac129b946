"""Wan's q/k norm + rotary: the compiled twin against the eager one and a float64 reference."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from ditplan.runtime.kernels import wan_qk
from ditplan.runtime.kernels.wan_qk import (
    _Fused,
    apply_wan_rotary,
    compiled,
    norm_rotate_qk,
    norm_rotate_qk_eager,
)

HEADS, DIM = 3, 8  # 3 heads of 8 channels
U = 2.0 ** -8  # bf16 unit roundoff (8 significant bits): |round(x) - x| <= U |x|
SLACK = 1.001  # float32 arithmetic before the bf16 rounding


class _Attn(nn.Module):
    """What norm_rotate_qk reads of a WanAttention: heads, norm_q, norm_k."""

    def __init__(self, device="cpu"):
        super().__init__()
        self.heads = HEADS
        self.norm_q = nn.RMSNorm(HEADS * DIM, eps=1e-6, device=device)
        self.norm_k = nn.RMSNorm(HEADS * DIM, eps=1e-6, device=device)
        with torch.no_grad():
            self.norm_q.weight.uniform_(0.5, 1.5)
            self.norm_k.weight.uniform_(0.5, 1.5)


def _inputs(seq=40, dtype=torch.float32, device="cpu", seed=0):
    gen = torch.Generator(device).manual_seed(seed)
    q, k = (torch.randn(2, seq, HEADS * DIM, generator=gen, device=device).to(dtype)
            for _ in range(2))
    angles = torch.rand(seq, DIM // 2, generator=gen, device=device) * 6.0
    cos = angles.cos().repeat_interleave(2, -1).view(1, seq, 1, DIM)  # Wan's tables: pairs equal
    sin = angles.sin().repeat_interleave(2, -1).view(1, seq, 1, DIM)
    return q, k, cos, sin


def _reference(x, weight, eps, cos, sin):
    """float64: RMSNorm, split heads, rotate each (even, odd) channel pair by its angle."""
    x, weight, cos, sin = (t.double() for t in (x, weight, cos, sin))
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight
    x = x.unflatten(2, (HEADS, -1))
    even, odd = x[..., 0::2], x[..., 1::2]
    c, s = cos[..., 0::2], sin[..., 0::2]
    return torch.stack((even * c - odd * s, even * s + odd * c), -1).flatten(-2)


def _module_path(attn, q, k, cos, sin):
    """What WanAttnProcessor does: the norm modules, split heads, rotate."""
    q, k = (t.unflatten(2, (HEADS, -1)) for t in (attn.norm_q(q), attn.norm_k(k)))
    return apply_wan_rotary(q, cos, sin), apply_wan_rotary(k, cos, sin)


def test_eager_twin_equals_the_module_path_bitwise_and_the_float64_reference():
    attn = _Attn()
    q, k, cos, sin = _inputs()
    args = (attn.norm_q.weight, attn.norm_k.weight, attn.norm_q.eps, cos, sin, HEADS)
    got_q, got_k = norm_rotate_qk_eager(q, k, *args)
    want_q, want_k = _module_path(attn, q, k, cos, sin)
    assert torch.equal(got_q, want_q) and torch.equal(got_k, want_k)
    ref_q = _reference(q, attn.norm_q.weight, 1e-6, cos, sin)
    # float32 arithmetic on O(1) values: a few ulps of float32
    torch.testing.assert_close(got_q.double(), ref_q, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got_q, q.unflatten(2, (HEADS, -1)), atol=1e-2)  # it did rotate


def test_cpu_calls_take_the_module_path():
    attn = _Attn()
    q, k, cos, sin = _inputs(dtype=torch.bfloat16)
    got = norm_rotate_qk(attn.to(torch.bfloat16), q, k, (cos, sin))
    want = _module_path(attn, q, k, cos, sin)
    assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True))


def test_compiled_twin_is_one_graph_equal_to_eager():
    attn = _Attn()
    q, k, cos, sin = _inputs()
    args = (q, k, attn.norm_q.weight, attn.norm_k.weight, attn.norm_q.eps, cos, sin, HEADS)
    torch._dynamo.reset()
    got = compiled(backend="aot_eager")(*args)  # fullgraph: a graph break raises
    want = norm_rotate_qk_eager(*args)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=0, atol=0)


def test_a_failing_compilation_falls_back_to_eager_once(caplog):
    attn = _Attn()
    q, k, cos, sin = _inputs()
    args = (q, k, attn.norm_q.weight, attn.norm_k.weight, attn.norm_q.eps, cos, sin, HEADS)
    fused = _Fused()

    def broken(*_):
        raise RuntimeError("no C compiler")

    fused.fn = broken
    with caplog.at_level(logging.WARNING, logger=wan_qk.__name__):
        got = fused(*args)
    assert fused.failed and "no C compiler" in caplog.text
    want = norm_rotate_qk_eager(*args)
    assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("seq", [40, 1_000])
def test_cuda_compiled_path_matches_eager_and_the_float64_reference(seq, monkeypatch):
    monkeypatch.delenv(wan_qk.ENV_SWITCH, raising=False)
    attn = _Attn(device="cuda").to(torch.bfloat16)
    q, k, cos, sin = _inputs(seq, torch.bfloat16, "cuda")
    got_q, got_k = norm_rotate_qk(attn, q, k, (cos, sin))
    assert not wan_qk._FUSED.failed and wan_qk._FUSED.fn is not None  # the compiled path ran
    want_q, want_k = _module_path(attn, q, k, cos, sin)
    ref_q = _reference(q, attn.norm_q.weight, 1e-6, cos, sin)
    ref_k = _reference(k, attn.norm_k.weight, 1e-6, cos, sin)
    for got, want, ref in ((got_q, want_q, ref_q), (got_k, want_k, ref_k)):
        # the fused path rounds once, at its bf16 output: within U of the pair's magnitude
        assert ((got.double() - ref).abs() <= U * SLACK * _pair_magnitude(ref)).all()
        _assert_eager_bound(want, ref)
    assert (got_q.double() - ref_q).abs().max() <= 2 * (want_q.double() - ref_q).abs().max()


def _pair_magnitude(x: torch.Tensor) -> torch.Tensor:
    """Each element's (even, odd) channel pair's length: what a rotation keeps."""
    pairs = x.unflatten(-1, (-1, 2))
    return pairs.norm(dim=-1, keepdim=True).expand_as(pairs).flatten(-2)


def _assert_eager_bound(eager: torch.Tensor, ref: torch.Tensor) -> None:
    """The module path rounds the norm's output to bf16 (each channel within U of itself, so
    each rotated channel within U (|even| + |odd|) <= sqrt(2) U |pair|) and the rotated output
    again (U |pair|): within (1 + sqrt(2)) U of the pair's magnitude. An absolute bound would
    not hold: pairs reach magnitude 4 (weights up to 1.5), where one bf16 rounding is 2^-7."""
    bound = (1 + 2 ** 0.5) * U * SLACK * _pair_magnitude(ref)
    assert ((eager.double() - ref).abs() <= bound).all()


def test_bf16_module_path_stays_within_its_rounding_bound():
    attn = _Attn().to(torch.bfloat16)
    for seed in range(3):
        q, k, cos, sin = _inputs(1_000, torch.bfloat16, seed=seed)
        want_q, _ = _module_path(attn, q, k, cos, sin)
        _assert_eager_bound(want_q, _reference(q, attn.norm_q.weight, 1e-6, cos, sin))


def test_compact_tables_rotate_as_diffusers_full_ones_bitwise():
    """The token permutation keeps only cos[..., 0::2] and sin[..., 1::2] (what Wan's processor
    reads); the rotation is the same, also when a table's pairs differ, and the compiled twin
    takes them too."""
    from ditplan.runtime.adapters.wan import diffusers_rotary

    attn = _Attn()
    q, k, _, _ = _inputs()
    gen = torch.Generator().manual_seed(3)
    cos, sin = (torch.randn(1, 40, 1, DIM, generator=gen) for _ in range(2))  # pairs differ
    compact = (cos[..., 0::2].contiguous(), sin[..., 1::2].contiguous())
    x = q.unflatten(2, (HEADS, -1))
    assert torch.equal(apply_wan_rotary(x, *compact), apply_wan_rotary(x, cos, sin))
    args = (attn.norm_q.weight, attn.norm_k.weight, attn.norm_q.eps)
    want = norm_rotate_qk_eager(q, k, *args, cos, sin, HEADS)
    got = compiled("aot_eager")(q, k, *args, *compact, HEADS)
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))

    attn.inner_dim = HEADS * DIM  # as WanAttention has it
    full = diffusers_rotary(attn, compact)  # what diffusers' processor gets on dense steps
    assert full[0].shape == cos.shape
    assert torch.equal(full[0][..., 0::2], cos[..., 0::2])
    assert torch.equal(full[1][..., 1::2], sin[..., 1::2])
    assert diffusers_rotary(attn, (cos, sin)) == (cos, sin)  # diffusers' own tables pass
