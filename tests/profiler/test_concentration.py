"""Attention concentration per layer and step phase from attention_recall rows."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ditplan.profiler.concentration import attention_concentration
from ditplan.profiler.run import profile_pipeline
from ditplan.profiler.schema import make_table
from tests.tool_scripts import load_tool


def _recall_table(rng: np.random.Generator, steps: int, layers: tuple[str, ...]):
    keys = [(s, c, layer, h, d) for s in range(steps) for c in ("cond", "uncond")
            for layer in layers for h in range(2) for d in (0.1, 0.2)]
    n = len(keys)
    return keys, make_table("attention_recall", {
        "run_id": ["r"] * n, "prompt_index": [0] * n, "seed": [0] * n,
        "step": [k[0] for k in keys], "cfg": [k[1] for k in keys], "layer": [k[2] for k in keys],
        "head": [k[3] for k in keys], "density": [k[4] for k in keys],
        "recall_predicted": rng.random(n), "recall_oracle": rng.random(n),
        "kept_fraction": rng.random(n)})


def test_means_per_layer_and_phase_match_a_direct_average():
    rng = np.random.default_rng(0)
    layers = ("blocks.0", "blocks.1")
    keys, table = _recall_table(rng, steps=7, layers=layers)
    result = attention_concentration(table, layers, density=0.2)
    assert result.phase_steps == ((0, 2), (3, 4), (5, 6))  # 7 steps in thirds: 3, 2, 2
    oracle = np.asarray(table["recall_oracle"].to_pylist())
    predicted = np.asarray(table["recall_predicted"].to_pylist())
    for i, layer in enumerate(layers):
        for j, (first, last) in enumerate(result.phase_steps):
            rows = [r for r, k in enumerate(keys)
                    if k[2] == layer and k[4] == 0.2 and first <= k[0] <= last]
            # float32 storage; means of a few float32 values agree to ~1e-7 relative
            assert result.oracle[i, j] == pytest.approx(oracle[rows].mean(), rel=1e-6)
            assert result.predicted[i, j] == pytest.approx(predicted[rows].mean(), rel=1e-6)
    for i, layer in enumerate(layers):
        for head in range(2):
            rows = [r for r, k in enumerate(keys) if k[2] == layer and k[4] == 0.2 and k[3] == head]
            assert result.head_oracle[i, head] == pytest.approx(oracle[rows].mean(), rel=1e-6)
    assert "blocks.1" in result.markdown() and set(result.as_dict()["layers"]) == set(layers)
    assert result.as_dict()["head_oracle"]["blocks.1"] == pytest.approx(result.head_oracle[1])


def test_missing_density_or_layer_is_refused_with_what_the_trace_has():
    rng = np.random.default_rng(1)
    _, table = _recall_table(rng, steps=3, layers=("blocks.0",))
    with pytest.raises(ValueError, match=r"\[0\.1.*0\.2"):
        attention_concentration(table, ("blocks.0",), density=0.3)
    with pytest.raises(ValueError, match="blocks.9"):
        attention_concentration(table, ("blocks.0", "blocks.9"))


@pytest.mark.parametrize("tile, sink", [((1, 4, 4), True), ((2, 4, 4), False)])
def test_the_tool_records_the_traces_tile_and_sink(tmp_path, reference_pipe, small_config,
                                                   tile, sink):
    # the sink follows the tile by default: on only for a tile one frame deep
    profile_pipeline(small_config(tmp_path / "trace", tile=tile), pipe=reference_pipe)
    tool = load_tool("attention_concentration")
    assert tool.main([str(tmp_path / "trace"), "--json", str(tmp_path / "c.json")]) == 0
    record = json.loads((tmp_path / "c.json").read_text())
    assert record["tile"] == list(tile) and record["sink"] is sink
    blocks = len(reference_pipe.transformer.blocks)
    assert set(record["layers"]) == {f"blocks.{i}" for i in range(blocks)}
