"""End to end on a tiny reference pipeline: tables, schema, report, resume, refusals."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest
import torch

from ditplan.profiler import run
from ditplan.profiler.manifest import MANIFEST_NAME, ProfileDirError
from ditplan.profiler.schema import METADATA_KEYS, TABLE_SCHEMAS, TraceError, read_traces

LAYERS, HEADS, STEPS, CONTEXTS, Q_BLOCKS = 2, 2, 3, 2, 4
PROMPTS = ("a red circle slowly moves right", "a blue square quickly moves up")


def test_clip_mode_writes_every_table_matching_the_schema(tmp_path, reference_pipe,
                                                          small_config):
    files = run.profile_pipeline(small_config(tmp_path, output_error=True), pipe=reference_pipe)
    assert files[-1] == tmp_path / "report.png"
    assert files[-1].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    parquet = [f for f in files if f.suffix == ".parquet"]
    assert len(parquet) == len(TABLE_SCHEMAS)
    for path in parquet:
        schema = pq.read_schema(path)
        name = schema.metadata[b"ditplan.table"].decode()
        assert schema.remove_metadata().equals(TABLE_SCHEMAS[name])
        assert set(METADATA_KEYS) <= {k.decode() for k in schema.metadata}
    traces = read_traces(tmp_path)
    rows = {name: t.num_rows for name, t in traces.tables.items()}
    per_call = LAYERS * HEADS * STEPS * CONTEXTS
    assert rows == {"attention_stats": per_call, "attention_recall": per_call * 5,
                    "attention_error": per_call * 5,
                    "attention_maps": per_call * Q_BLOCKS,  # maps at steps 0, 1, 2 (default)
                    "step_change": (STEPS - 1) * CONTEXTS * (LAYERS + 1)}
    meta = traces.metadata
    assert meta.workload.tokens_grid == (4, 8, 8) and meta.workload.cfg
    assert meta.profiler_settings["mode"] == "clip"
    assert meta.fingerprint.weights_hash is not None
    reference_pipe.scheduler.set_timesteps(STEPS)
    expected = reference_pipe.scheduler.sigmas[:STEPS].tolist()
    assert meta.workload.sigmas == pytest.approx(expected) and expected[0] > expected[-1] > 0
    stats = traces.tables["attention_stats"]
    fraction = stats["foreground_fraction"].to_pylist()
    assert min(fraction) > 0 and len(set(fraction)) == 1  # ground truth: one mask per clip


def test_policy_compiler_reads_the_traces(tmp_path, reference_pipe, small_config):
    from ditplan.policy.load_profile import load_profile

    run.profile_pipeline(small_config(tmp_path), pipe=reference_pipe)
    profile = load_profile(tmp_path)
    assert profile.recall_predicted.shape == (LAYERS, HEADS, 5, STEPS * CONTEXTS)
    assert profile.residual_change.shape == (CONTEXTS, LAYERS, STEPS)


def test_attention_steps_limit_the_statistics_but_not_the_step_change(tmp_path, reference_pipe,
                                                                       small_config):
    from ditplan.policy.compiler import compile_policy
    from ditplan.policy.load_profile import load_profile

    run.profile_pipeline(small_config(tmp_path, attention_steps=(0, 2)), pipe=reference_pipe)
    traces = read_traces(tmp_path)
    for name in ("attention_stats", "attention_recall", "attention_maps"):
        assert set(traces.tables[name]["step"].to_pylist()) == {0, 2}, name
    assert set(traces.tables["step_change"]["step"].to_pylist()) == {1, 2}
    assert traces.metadata.profiler_settings["attention_steps"] == [0, 2]
    profile = load_profile(tmp_path)
    assert profile.recall_predicted.shape == (LAYERS, HEADS, 5, 2 * CONTEXTS)
    assert compile_policy(tmp_path).workload.steps == STEPS


def test_map_steps_outside_the_attention_steps_are_refused(tmp_path, small_config):
    with pytest.raises(ValueError, match=r"map steps \[1\] are not attention steps"):
        small_config(tmp_path, attention_steps=(0, 2), map_steps=(1,))
    with pytest.raises(ValueError, match=r"attention steps \[5\] are outside 0..2"):
        small_config(tmp_path, attention_steps=(5,))


def test_sample_mode_uses_the_estimated_foreground(tmp_path, reference_pipe, small_config):
    run.profile_pipeline(small_config(tmp_path, mode="sample", guidance_scale=1.0),
                         pipe=reference_pipe)
    traces = read_traces(tmp_path)
    assert traces.metadata.profiler_settings["mode"] == "sample"
    assert "kmeans" in traces.metadata.profiler_settings["foreground"]
    assert set(traces.tables["attention_stats"]["cfg"].to_pylist()) == {"cond"}  # no CFG


def interrupt_at(monkeypatch, step_count: int):
    """Make the progress callback raise KeyboardInterrupt at the given global step."""
    seen = {"steps": 0}
    original = run._progress

    def progress(bar):
        inner = original(bar)

        def on_step_end(pipe, step, timestep, tensors):
            seen["steps"] += 1
            if seen["steps"] == step_count:
                raise KeyboardInterrupt
            return inner(pipe, step, timestep, tensors)

        return on_step_end

    monkeypatch.setattr(run, "_progress", progress)


def test_resumed_run_equals_uninterrupted_run(tmp_path, reference_pipe, small_config,
                                              monkeypatch):
    config = small_config(tmp_path / "whole", prompts=PROMPTS)
    run.profile_pipeline(config, pipe=reference_pipe)
    resumed = small_config(tmp_path / "resumed", prompts=PROMPTS)
    with monkeypatch.context() as patch:
        interrupt_at(patch, STEPS + 2)  # in the middle of the second prompt
        with pytest.raises(KeyboardInterrupt):
            run.profile_pipeline(resumed, pipe=reference_pipe)
    manifest = json.loads((resumed.out / MANIFEST_NAME).read_text())
    assert sorted(manifest["finished"]) == ["p0000-s0"]
    assert not list(resumed.out.rglob("*.tmp"))  # no partial file left behind
    assert type(reference_pipe.transformer.blocks[0].attn1.processor).__name__ \
        == "WanAttnProcessor"  # the interrupted recorder was removed
    calls = []
    original = run._profile_unit
    monkeypatch.setattr(run, "_profile_unit", lambda *a: calls.append(a[3]) or original(*a))
    run.profile_pipeline(resumed, pipe=reference_pipe)
    assert calls == [PROMPTS[1]]  # the finished prompt was skipped
    whole, again = read_traces(config.out), read_traces(resumed.out)
    assert whole.tables.keys() == again.tables.keys()
    for name in whole.tables:
        assert whole.tables[name].equals(again.tables[name]), name


def test_other_arguments_into_the_same_folder_are_refused(tmp_path, reference_pipe,
                                                          small_config):
    run.profile_pipeline(small_config(tmp_path), pipe=reference_pipe)
    with pytest.raises(ProfileDirError, match=r"other arguments.*steps: 3 -> 2"):
        run.profile_pipeline(small_config(tmp_path, steps=2), pipe=reference_pipe)


def test_foreign_parquet_folder_is_refused(tmp_path, reference_pipe, small_config):
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "data.parquet").write_bytes(b"PAR1")
    with pytest.raises(ProfileDirError, match="not a `ditplan profile` folder"):
        run.profile_pipeline(small_config(tmp_path / "foreign"), pipe=reference_pipe)


def _any_trace(out, pipe, small_config):
    return [f for f in run.profile_pipeline(small_config(out), pipe=pipe)
            if f.suffix == ".parquet"][0]


def test_truncated_trace_is_refused_then_repaired_by_a_rerun(tmp_path, reference_pipe,
                                                             small_config):
    config = small_config(tmp_path)
    victim = _any_trace(tmp_path, reference_pipe, small_config)
    good = read_traces(tmp_path).tables
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2])
    with pytest.raises(TraceError, match="truncated or corrupt"):
        read_traces(tmp_path)
    run.profile_pipeline(config, pipe=reference_pipe)  # the damaged unit is profiled again
    repaired = read_traces(tmp_path).tables
    assert all(good[name].equals(repaired[name]) for name in good)


def test_clip_mode_needs_the_reference_pipeline():
    with pytest.raises(ValueError, match="needs the reference model"):
        run.resolve_mode("clip", object())
    assert run.resolve_mode("auto", object()) == "sample"


def test_non_reference_caption_in_clip_mode_is_refused(tmp_path, reference_pipe, small_config):
    config = small_config(tmp_path, prompts=("a cat walking on grass",))
    with pytest.raises(ValueError, match="not a reference caption"):
        run.profile_pipeline(config, pipe=reference_pipe)
    assert not list(tmp_path.rglob("*.parquet"))


def test_run_id_is_stable_and_argument_dependent(small_config, tmp_path):
    a = small_config(tmp_path / "a").identity()
    b = small_config(tmp_path / "b").identity()
    assert run.run_id_of(a) == run.run_id_of(b)
    assert run.run_id_of(a) != run.run_id_of(small_config(tmp_path, seeds=(1,)).identity())
    assert torch.device(small_config(tmp_path).resolved().device).type == "cpu"
