"""Attention statistics under key padding (design D7): padded keys get no mass, as in the model."""

from __future__ import annotations

import pytest
import torch

from ditplan.profiler import metrics as M
from tests.profiler.test_metrics import TOL32, TOL64, assert_summary_close, qk


@pytest.mark.parametrize(("shape", "valid"), [((2, 2, 200, 16), (200, 131)),
                                              ((3, 1, 70, 8), (64, 1, 69))])
@pytest.mark.parametrize("tile_rows", [64, None])
def test_padded_summary_equals_the_masked_full_matrix(shape, valid, tile_rows):
    q, k = qk(shape)
    key_valid = torch.tensor(valid)
    fast = M.attention_summary(q, k, block_size=64, tile_rows=tile_rows, key_valid=key_valid)
    ref = M.attention_summary_reference(q, k, block_size=64, key_valid=key_valid)
    assert_summary_close(fast, ref, TOL64)
    assert torch.isfinite(fast.entropy).all()
    for b, limit in enumerate(valid):
        assert (fast.received[b, :, limit:] == 0).all()  # padding receives nothing
    torch.testing.assert_close(fast.block_mass.sum(-1), torch.ones_like(fast.block_mass[..., 0]))


def test_padded_summary_float32_and_all_valid_equals_unpadded():
    q, k = qk((2, 2, 200, 16), dtype=torch.float32)
    key_valid = torch.tensor([200, 150])
    fast = M.attention_summary(q, k, block_size=64, tile_rows=64, key_valid=key_valid)
    ref = M.attention_summary_reference(q, k, block_size=64, key_valid=key_valid)
    assert_summary_close(fast, ref, TOL32)
    plain = M.attention_summary(q, k, block_size=64, tile_rows=64)
    assert torch.equal(fast.block_mass[0], plain.block_mass[0])  # nothing padded in element 0
