"""Similarity of a generated video to a reference one: PSNR, SSIM, cosine similarity."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def psnr(x: torch.Tensor, ref: torch.Tensor, data_range: float = 1.0) -> float:
    """Peak signal-to-noise ratio in dB over all elements; inf for identical inputs."""
    mse = torch.mean((x.double() - ref.double()) ** 2)
    return float("inf") if mse == 0 else float(10 * torch.log10(data_range**2 / mse))


def cosine_similarity(x: torch.Tensor, ref: torch.Tensor) -> float:
    """Cosine similarity of the two videos flattened to vectors."""
    return float(F.cosine_similarity(x.double().flatten(), ref.double().flatten(), dim=0))


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    return g / g.sum()  # [size]


def ssim(x: torch.Tensor, ref: torch.Tensor, data_range: float = 1.0) -> float:
    """Mean SSIM (Wang et al. 2004: 11x11 Gaussian window, sigma 1.5, valid region).

    Args:
        x, ref: frames [N, H, W, C] in [0, data_range] (each frame and channel scored alone).
    """
    imgs = torch.stack([x, ref]).double().permute(0, 1, 4, 2, 3).flatten(1, 2)  # [2, N*C, H, W]
    imgs = imgs.reshape(2, -1, 1, *imgs.shape[-2:])  # [2, N*C, 1, H, W]
    g = _gaussian_window(min(11, *imgs.shape[-2:]))
    kernel = (g[:, None] * g[None, :])[None, None]  # [1, 1, k, k]

    def blur(t):
        return F.conv2d(t, kernel)

    a, b = imgs[0], imgs[1]
    mu_a, mu_b = blur(a), blur(b)
    var_a, var_b = blur(a * a) - mu_a**2, blur(b * b) - mu_b**2
    cov = blur(a * b) - mu_a * mu_b
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    num = (2 * mu_a * mu_b + c1) * (2 * cov + c2)
    den = (mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2)
    return float((num / den).mean())


def ssim_reference(x: torch.Tensor, ref: torch.Tensor, data_range: float = 1.0) -> float:
    """:func:`ssim` with explicit loops over frames, channels and window positions (test oracle)."""
    frames, height, width, channels = x.shape
    k = min(11, height, width)
    g = _gaussian_window(k)
    w = g[:, None] * g[None, :]
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    scores = []
    for n in range(frames):
        for c in range(channels):
            a, b = x[n, :, :, c].double(), ref[n, :, :, c].double()
            for i in range(height - k + 1):
                for j in range(width - k + 1):
                    pa, pb = a[i : i + k, j : j + k], b[i : i + k, j : j + k]
                    ma, mb = (w * pa).sum(), (w * pb).sum()
                    va, vb = (w * pa * pa).sum() - ma**2, (w * pb * pb).sum() - mb**2
                    cv = (w * pa * pb).sum() - ma * mb
                    num = (2 * ma * mb + c1) * (2 * cv + c2)
                    scores.append(num / ((ma**2 + mb**2 + c1) * (va + vb + c2)))
    return float(torch.stack(scores).mean())


def compare_videos(x: torch.Tensor, ref: torch.Tensor) -> dict:
    """PSNR, SSIM and cosine similarity of frames [N, H, W, C] in [0, 1] against ``ref``."""
    return {"psnr_db": psnr(x, ref), "ssim": ssim(x, ref), "cosine": cosine_similarity(x, ref)}
