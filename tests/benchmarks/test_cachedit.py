"""cache-dit's DBCache methods: rows without cache-dit or at scale, and (where cache-dit is
installed) cache hits on the tiny reference pipeline, a fresh cache per generation, exact undo."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from benchmarks.quality.cachedit import CACHE_DIT_VERSION, cachedit_methods
from benchmarks.quality.methods import method_row
from tests.factories import tiny_reference_pipeline

STEPS = 8


def _methods(thresholds=(0.08, 0.24), steps=STEPS, adapt=None):
    return cachedit_methods(SimpleNamespace(steps=steps, adapt=adapt), thresholds)


def _rows(methods) -> list[dict]:
    return [method_row(m, object(), measure=lambda installed: pytest.fail("installed"))
            for m in methods]


def test_the_grid_is_dbcache_f1b0_without_then_with_taylorseer():
    methods = _methods(steps=32)
    assert [m.name for m in methods] == ["cache-dit/t=0.08", "cache-dit/t=0.24",
                                         "cache-dit-taylorseer/t=0.08",
                                         "cache-dit-taylorseer/t=0.24"]
    assert [m.params["taylorseer_order"] for m in methods] == [None, None, 1, 1]
    for method in methods:
        params = method.params
        assert (params["Fn_compute_blocks"], params["Bn_compute_blocks"]) == (1, 0)
        assert params["enable_separate_cfg"] is True and params["num_inference_steps"] == 32
        assert params["max_warmup_steps"] == 4  # 10% of the steps
    assert _methods(steps=4)[0].params["max_warmup_steps"] == 1


def test_without_cache_dit_the_rows_say_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "cache_dit", None)  # makes `import cache_dit` fail
    rows = _rows(_methods())
    assert {r["status"] for r in rows} == {"not_applicable"}
    assert all(f"pip install cache-dit=={CACHE_DIT_VERSION}" in r["reason"] for r in rows)


def test_at_scale_the_rows_are_not_applicable():
    rows = _rows(_methods(adapt=lambda plan, transformer: plan))
    assert len(rows) == 4 and {r["status"] for r in rows} == {"not_applicable"}
    assert all("random weights" in r["reason"] for r in rows)


def test_the_bench_extra_pins_the_version_the_methods_name():
    tomllib = pytest.importorskip("tomllib")
    pyproject = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())
    bench = pyproject["project"]["optional-dependencies"]["bench"]
    assert f"cache-dit=={CACHE_DIT_VERSION}" in bench


def _generate(pipe) -> torch.Tensor:
    return pipe(["a red circle slowly moves right"], num_inference_steps=STEPS,
                guidance_scale=4.0, num_frames=4, height=16, width=16,
                generator=[torch.Generator().manual_seed(0)]).frames


@pytest.mark.slow
@pytest.mark.parametrize("taylorseer", [False, True], ids=["dbcache", "taylorseer"])
def test_cache_hits_change_the_output_each_generation_alike_and_undo_restores(taylorseer):
    pytest.importorskip("cache_dit")
    pipe = tiny_reference_pipeline()
    pipe.set_progress_bar_config(disable=True)
    dense = _generate(pipe)
    method = _methods(thresholds=(0.24,))[int(taylorseer)]
    assert method.family.endswith("taylorseer") == taylorseer
    installed = method.install(pipe)
    try:
        first = _generate(pipe)
        stats = installed.stats()
        second = _generate(pipe)  # without a context refresh the cache would carry over
    finally:
        installed.undo()
    assert stats["cached_steps"] and stats["cfg_cached_steps"]  # both CFG branches hit
    assert 0 not in stats["cached_steps"]  # the warm-up step always computes
    calls = len(stats["cached_steps"]) + len(stats["cfg_cached_steps"])
    assert stats["cached_calls_share"] == pytest.approx(calls / (2 * STEPS))
    blocks = len(pipe.transformer.blocks)
    assert stats["blocks_skipped_share"] == pytest.approx(
        stats["cached_calls_share"] * (blocks - 1) / blocks)
    assert not torch.equal(first, dense)
    assert torch.equal(first, second)
    assert torch.equal(_generate(pipe), dense)
