"""Residual sketches: linear, norm-preserving on average, deterministic, any shape."""

import torch

from ditplan.profiler.sketch import Sketcher


def test_sketch_is_linear_and_deterministic():
    a, b = torch.randn(2, 50, 7), torch.randn(2, 50, 7)
    sketch = Sketcher(16)
    torch.testing.assert_close(sketch(2 * a - 3 * b), 2 * sketch(a) - 3 * sketch(b),
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(Sketcher(16)(a), sketch(a), rtol=0, atol=0)


def test_sketch_norm_estimates_the_tensor_norm():
    sketch = Sketcher(64)
    ratios = torch.stack([sketch(x).square().sum() / x.square().sum()
                          for x in torch.randn(200, 3, 40, 9)])
    # unbiased: the mean ratio of squared norms is 1 (std of one ratio ~ sqrt(2/64) = 0.18)
    assert abs(ratios.mean().item() - 1.0) < 0.05
    assert ratios.std().item() < 0.3


def test_sketch_of_a_short_tensor_and_a_bfloat16_one():
    assert Sketcher(64)(torch.ones(5)).shape == (5,)
    x = torch.randn(1, 30, 11)
    got = Sketcher(8)(x.bfloat16())
    assert got.dtype == torch.float32 and got.shape == (8,)
    torch.testing.assert_close(got, Sketcher(8)(x.bfloat16().float()), rtol=1e-2, atol=1e-2)
