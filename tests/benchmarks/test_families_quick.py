"""benchmarks.families: the published configs build at their sizes; the quick run times every
family dense and sparse on the CPU."""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks.families import CLASSES, build, main
from benchmarks.family_configs import FULL, QUICK

# Parameters (billions, rounded) of the published transformers, and the token counts.
PUBLISHED = {"wan22_ti2v_5b": (5.0, 27_280), "hunyuan_video": (12.8, 118_800),
             "qwen_image": (20.4, 6_889), "flux1_dev": (11.9, 16_384)}


@pytest.mark.parametrize("family", sorted(FULL))
def test_published_configs_build_at_their_size_and_shape(family):
    model, inputs = build(family, FULL[family], "meta", torch.bfloat16)  # no memory, no init
    params = sum(p.numel() for p in model.parameters()) / 1e9
    assert (round(params, 1), FULL[family].tokens) == PUBLISHED[family]
    assert type(model).__name__ == CLASSES[family]
    assert model.dtype == torch.bfloat16 and inputs["hidden_states"].dtype == torch.bfloat16
    assert torch.get_default_dtype() == torch.float32  # restored after the build


def test_quick_run_times_every_family_dense_and_sparse(tmp_path):
    result = main(["--quick", "--repeats", "1", "--json", str(tmp_path / "families.json")])
    rows = result["rows"]
    assert [r["family"] for r in rows] == list(QUICK)
    for row in rows:
        assert row["tokens"] == QUICK[row["family"]].tokens
        assert row["dense_ms"] > 0 and row["sparse_ms"] > 0
        assert row["speedup"] == row["dense_ms"] / row["sparse_ms"]
        assert row["density"] < 0.5  # block pairs were dropped (sink, text, diagonal kept)
        assert 1e-3 < row["sparse_rel_diff"] < 0.5  # so the output moved, not far
    assert json.loads((tmp_path / "families.json").read_text()) == result


def test_quick_run_with_the_estimate_adds_its_row():
    result = main(["--quick", "--repeats", "1", "--families", "flux1_dev", "hunyuan_video",
                   "--estimate-too"])
    for row in result["rows"]:
        assert row["estimated_ms"] > 0 and row["estimated_speedup"] > 0
        # the same kept blocks with the dropped ones estimated: a different output
        assert row["estimated_rel_diff"] != row["sparse_rel_diff"]
        assert row["estimated_rel_diff"] < 0.5
