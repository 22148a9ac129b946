"""Random-sign sketches of block residuals: small linear images that keep norms and differences.

The element i of a tensor, flattened, gets a fixed random sign and lands in bucket
i // ceil(N / size); a bucket's sketch value is its signed sum. The map is linear, so the
sketch of a forecast's error is the forecast's error on the sketches, and the squared norm of a
sketch is an unbiased estimate of the tensor's (the cross terms have random signs). The compiler
replays block-run schedules on these sketches to measure their forecast error from the traces.
"""

from __future__ import annotations

import torch

SKETCH_SEED = 20261130


class Sketcher:
    """Sketches of ``size`` values for tensors of any shape (signs cached per element count)."""

    def __init__(self, size: int):
        if size < 1:
            raise ValueError(f"sketch size must be >= 1, got {size}")
        self.size = size
        self._signs: dict[tuple[int, torch.device], torch.Tensor] = {}

    def __call__(self, value: torch.Tensor) -> torch.Tensor:
        """The sketch [min(size, N)] float32 of ``value`` (any shape, N elements)."""
        flat = value.detach().reshape(-1)
        size = min(self.size, flat.numel())
        width = -(-flat.numel() // size)  # ceil: the last bucket may be shorter
        signed = flat * self._signs_for(flat.numel(), flat.device).to(flat.dtype)
        padded = torch.nn.functional.pad(signed, (0, size * width - flat.numel()))
        return padded.view(size, width).sum(dim=1, dtype=torch.float32)

    def _signs_for(self, numel: int, device: torch.device) -> torch.Tensor:
        key = (numel, device)
        if key not in self._signs:
            generator = torch.Generator().manual_seed(SKETCH_SEED)
            bits = torch.randint(0, 2, (numel,), generator=generator, dtype=torch.int8)
            self._signs[key] = (bits * 2 - 1).to(device)  # [N] of +-1
        return self._signs[key]
