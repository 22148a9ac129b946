"""The expert index of a two-expert profile: recorded step ranges, checked and read back."""

from __future__ import annotations

import pytest

from ditplan.profiler import run
from ditplan.profiler.config import ProfileConfigError
from ditplan.profiler.experts import EXPERTS_INDEX, ExpertIndex, read_index, write_index
from ditplan.profiler.schema import TraceError
from tests.experts_factories import tiny_experts_pipeline


def test_ranges_come_from_the_calls(tmp_path):
    calls = {"transformer": [0, 0, 1, 1, 2, 2], "transformer_2": [3, 3, 4, 4]}
    index = ExpertIndex.from_calls(calls, 5, 0.875)
    assert index.step_ranges == {"transformer": (0, 3), "transformer_2": (3, 5)}
    write_index(tmp_path / "new", index)
    assert read_index(tmp_path / "new") == index
    assert read_index(tmp_path) is None  # a one-transformer profile


@pytest.mark.parametrize("calls, message", [
    ({"transformer": [0, 1, 2, 3], "transformer_2": []}, "transformer_2 ran none of the 4"),
    ({"transformer": [0, 2], "transformer_2": [1, 3]}, "not one range starting at step 0"),
    ({"transformer": [2, 3], "transformer_2": [0, 1]}, "not one range starting at step 0"),
    ({"transformer": [0], "transformer_2": [1, 2]}, "ran steps 0..2 of 4"),
])
def test_calls_that_are_not_two_ranges_refused(calls, message):
    with pytest.raises(TraceError, match=message):
        ExpertIndex.from_calls(calls, 4, 0.5)


def test_unreadable_or_newer_index_refused(tmp_path):
    (tmp_path / EXPERTS_INDEX).write_text('{"version": 1}')
    with pytest.raises(TraceError, match="unreadable .*re-run `ditplan profile`"):
        read_index(tmp_path)
    (tmp_path / EXPERTS_INDEX).write_text(
        '{"version": 2, "boundary_ratio": 0.5, "steps": 2, "step_ranges": {}}')
    with pytest.raises(TraceError, match="newer than this ditplan reads"):
        read_index(tmp_path)


def test_an_expert_without_attention_steps_refused_before_writing(tmp_path, small_config):
    config = small_config(tmp_path / "out", steps=4, attention_steps=(0, 1), map_steps=(0,))
    with pytest.raises(ProfileConfigError, match=r"none of transformer_2's steps \[2, 3\]"):
        run.profile_pipeline(config, pipe=tiny_experts_pipeline())
    assert not list(config.out.rglob("*.parquet")) and not (config.out / EXPERTS_INDEX).exists()
