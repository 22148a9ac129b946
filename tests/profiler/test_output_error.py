"""The profiler's sparse-output errors (dropped blocks left out or estimated) vs the oracle."""

from __future__ import annotations

import pytest
import torch

from ditplan.profiler.output_error import output_errors, output_errors_reference, relative_error
from ditplan.runtime.kernels.block_map import forced_blocks

DENSITIES = (0.1, 0.3, 0.5, 1.0)


@pytest.mark.parametrize("seq,key_valid", [(256, None), (200, None), (256, [180, 256])])
def test_output_errors_match_the_oracle(seq, key_valid):
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, seq, 16, generator=generator, dtype=torch.float64)
               for _ in range(3))
    valid = None if key_valid is None else torch.tensor(key_valid)
    forced = forced_blocks(seq, 64)
    errors = output_errors(q, k, v, block_size=64, densities=DENSITIES, forced=forced,
                           key_valid=valid)
    expected = output_errors_reference(q, k, v, block_size=64, densities=DENSITIES,
                                       forced=forced, key_valid=valid)
    assert errors.shape == (2, 3, len(DENSITIES), 2)
    torch.testing.assert_close(errors, expected, rtol=1e-9, atol=1e-12)
    assert (errors[:, :, -1] < 1e-12).all()  # density 1: every block kept, nothing to estimate
    assert (errors[:, :, 0] > 1e-3).all()  # density 0.1 drops mass either way


def test_relative_error_is_per_head():
    dense = torch.ones(1, 2, 4, 3)
    out = dense.clone()
    out[0, 1] *= 1.5
    torch.testing.assert_close(relative_error(out, dense), torch.tensor([[0.0, 0.5]]))
