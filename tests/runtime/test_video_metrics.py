"""Video similarity metrics against loop references and known values."""

from __future__ import annotations

import math

import torch

from ditplan.runtime.video_metrics import compare_videos, psnr, ssim, ssim_reference


def test_ssim_matches_loop_reference_on_random_frames():
    g = torch.Generator().manual_seed(3)
    x = torch.rand(2, 14, 13, 3, generator=g)
    noisy = (x + 0.1 * torch.randn(x.shape, generator=g)).clamp(0, 1)
    # Both accumulate in float64 over <= 121-term sums: agreement to ~1e-12 is expected.
    assert math.isclose(ssim(noisy, x), ssim_reference(noisy, x), rel_tol=1e-9)
    assert 0.0 < ssim(noisy, x) < 0.99


def test_identical_videos_and_known_psnr():
    x = torch.rand(3, 16, 16, 3, dtype=torch.float64)  # float64: x + 0.1 - x is 0.1 to 1e-16
    assert math.isclose(ssim(x, x), 1.0, rel_tol=1e-12) and psnr(x, x) == float("inf")
    shifted = x + 0.1  # MSE 0.01 -> 20 dB
    assert math.isclose(psnr(shifted, x), 20.0, rel_tol=1e-9)
    metrics = compare_videos(x, x)
    assert math.isclose(metrics["cosine"], 1.0, rel_tol=1e-12)  # float64 norm rounding
