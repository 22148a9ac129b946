"""Rectified-flow training math: sigma sampling, noisy inputs and the velocity target.

Convention (as diffusers' FlowMatchEulerDiscreteScheduler samples it): x_sigma = (1 - sigma) x0 +
sigma * noise, sigma = 1 is pure noise, the model predicts v = noise - x0, and the transformer's
timestep is sigma * 1000.
"""

from __future__ import annotations

import torch

NUM_TRAIN_TIMESTEPS = 1000


def shift_sigmas(sigma: torch.Tensor, shift: float) -> torch.Tensor:
    """The scheduler's static shift: shift * s / (1 + (shift - 1) * s); shift=1 is the identity."""
    return shift * sigma / (1 + (shift - 1) * sigma)


def sample_sigmas(
    batch_size: int,
    generator: torch.Generator,
    *,
    shift: float = 1.0,
    uniform_fraction: float = 0.1,
) -> torch.Tensor:
    """Draws training sigmas: logit-normal(0, 1), shifted like the sampler, mixed with uniform.

    The uniform share keeps the low-noise end (which decides whether the background comes out
    clean and static) trained even when the shift moves most samples to high noise.

    Args:
        batch_size: B.
        generator: the only source of randomness; its device is the result's.
        shift: the sampler's sigma shift.
        uniform_fraction: share of sigmas drawn uniformly from (0, 1) instead.

    Returns:
        float [B] in (0, 1).
    """
    dev = generator.device
    logit_normal = torch.sigmoid(torch.randn(batch_size, generator=generator, device=dev))
    uniform = torch.rand(batch_size, generator=generator, device=dev)
    pick_uniform = torch.rand(batch_size, generator=generator, device=dev) < uniform_fraction
    sigma = torch.where(pick_uniform, uniform, shift_sigmas(logit_normal, shift))
    return sigma.clamp(1e-4, 1 - 1e-4)


def noisy_sample(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """x_sigma = (1 - sigma) x0 + sigma noise; x0, noise [B, ...], sigma [B]."""
    s = sigma.view(-1, *([1] * (x0.dim() - 1)))
    return (1 - s) * x0 + s * noise


def velocity_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The rectified-flow target v = noise - x0 (same shape as x0)."""
    return noise - x0
