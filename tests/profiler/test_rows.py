"""TraceRows: attention maps of different sizes (per-branch text lengths) share one table."""

from __future__ import annotations

import torch

from ditplan.profiler.config import RecorderSettings
from ditplan.profiler.rows import TraceRows


def test_maps_of_different_block_counts_become_rows():
    settings = RecorderSettings(densities=(0.5,))
    rows = TraceRows(settings)
    stats, recall = torch.zeros(2, len(TraceRows.STATS)), torch.zeros(2, 1, 3)
    error = torch.zeros(2, 1, 2)
    cond = torch.arange(2 * 3 * 3, dtype=torch.float32).reshape(2, 3, 3)  # 3 blocks
    uncond = -torch.arange(2 * 2 * 2, dtype=torch.float32).reshape(2, 2, 2)  # shorter text
    rows.add_attention(1, "cond", "blocks.0", stats, recall, error, cond)
    rows.add_attention(1, "uncond", "blocks.0", stats, recall, error, uncond)
    maps = rows.columns()["attention_maps"]
    assert maps["cfg"] == ["cond"] * 6 + ["uncond"] * 4
    assert maps["head"].tolist() == [0, 0, 0, 1, 1, 1, 0, 0, 1, 1]
    assert maps["q_block"].tolist() == [0, 1, 2, 0, 1, 2, 0, 1, 0, 1]
    assert maps["mass"].to_pylist() == [*cond.flatten(0, 1).tolist(),
                                        *uncond.flatten(0, 1).tolist()]
