"""The trace contract: written files match the schema exactly; bad files are refused clearly."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ditplan.profiler import schema as S

KEYS = {"run_id": ["r1", "r1"], "prompt_index": [0, 0], "seed": [7, 7], "step": [1, 2],
        "cfg": ["cond", "uncond"], "layer": ["blocks.0", "blocks.1"]}
ROWS = {
    "attention_stats": {**KEYS, "head": [0, 1], "sink_mass": [0.1, 0.2], "text_mass": [0.0, 0.0],
                        "entropy": [0.4, 0.6], "r_attn": [0.7, 0.3], "r_attn_threshold": [2.0, 2.0],
                        "fg_bg_mass_ratio": [2.5, 0.5], "foreground_fraction": [0.3, 0.3]},
    "attention_recall": {**KEYS, "head": [0, 1], "density": [0.1, 0.2],
                         "recall_predicted": [0.8, 0.9], "recall_oracle": [0.85, 0.93],
                         "kept_fraction": [0.18, 0.27]},
    "attention_error": {**KEYS, "head": [0, 1], "density": [0.1, 0.2],
                        "error_dropped": [0.3, 0.2], "error_estimated": [0.2, 0.25]},
    "attention_maps": {**KEYS, "head": [0, 0], "q_block": [0, 1],
                       "mass": [[0.7, 0.2, 0.1], [0.1, 0.8, 0.1]]},
    "step_change": {**KEYS, "layer": ["blocks.0", S.OUTPUT_LAYER], "rel_l1": [0.3, 0.1],
                    "cos_dist": [0.02, 0.01]},
}


def meta(run_id="r1", config_hash="abc", **workload) -> S.TraceMetadata:
    blocks = ("blocks.0", "blocks.1")
    model = S.ModelConfig(num_layers=2, num_heads=2, head_dim=16, ffn_dim=64,
                          patch_size=(1, 2, 2), text_len=8, cross_attention=True,
                          joint_attention=False, blocks=blocks,
                          self_attention={b: f"{b}.attn1" for b in blocks})
    work = dict(steps=4, height=32, width=32, frames=5, guidance_scale=5.0, cfg=True,
                tokens_grid=(2, 16, 16))
    return S.TraceMetadata(
        run_id=run_id, fingerprint=S.ModelFingerprint("WanTransformer3DModel", config_hash),
        model_config=model, workload=S.Workload(**{**work, **workload}),
        profiler_settings={"block_size": 128, "tile": [1, 8, 8], "densities": [0.1, 0.2],
                           "sink": True, "map_steps": [1]},
        library_versions={"torch": "2.13.0", "pyarrow": pa.__version__},
    )


def write_all(directory, metadata=None):
    metadata = metadata or meta()
    for name, columns in ROWS.items():
        S.write_table(directory / f"{name}.parquet", S.make_table(name, columns), metadata)


@pytest.mark.parametrize("name", sorted(S.TABLE_SCHEMAS))
def test_written_file_matches_schema_exactly(tmp_path, name):
    path = S.write_table(tmp_path / "t.parquet", S.make_table(name, ROWS[name]), meta())
    written = pq.read_schema(path)
    assert written.remove_metadata().equals(S.TABLE_SCHEMAS[name], check_metadata=False)
    assert [f.nullable for f in written] == [f.nullable for f in S.TABLE_SCHEMAS[name]]
    file_meta = {k.decode(): v.decode() for k, v in written.metadata.items() if b"ARROW" not in k}
    assert set(file_meta) == set(S.METADATA_KEYS)
    assert file_meta[S.META_SCHEMA_VERSION] == S.PROFILE_SCHEMA_VERSION
    assert file_meta[S.META_TABLE] == name
    assert S.TraceMetadata.from_parquet(file_meta, path) == meta()
    assert json.loads(file_meta[S.META_WORKLOAD])["tokens_grid"] == [2, 16, 16]
    assert list(tmp_path.iterdir()) == [path]  # no temp file left behind


def test_read_traces_round_trip(tmp_path):
    write_all(tmp_path)
    traces = S.read_traces(tmp_path)
    assert sorted(traces.tables) == sorted(S.TABLE_SCHEMAS)
    for name, columns in ROWS.items():
        got = traces.tables[name].to_pydict()
        assert got["layer"] == columns["layer"] and got["step"] == columns["step"]
    assert traces.tables["attention_maps"]["mass"].to_pylist()[1] == pytest.approx([.1, .8, .1])
    assert traces.metadata == meta() and traces.run_ids == ("r1",)
    assert len(traces.content_hash) == 64


def test_write_refuses_wrong_types_and_leaves_nothing(tmp_path):
    columns = dict(ROWS["step_change"])
    table = pa.table({k: v for k, v in columns.items()})  # int64 / double: not the contract
    with pytest.raises(S.TraceError, match="make_table"):
        S.write_table(tmp_path / "bad.parquet", table, meta())
    with pytest.raises(S.TraceError, match="run_id"):
        S.write_table(tmp_path / "bad.parquet", S.make_table("step_change", columns),
                      meta(run_id="other"))
    with pytest.raises(S.TraceError, match="missing columns"):
        S.make_table("step_change", {"run_id": ["x"]})
    assert list(tmp_path.iterdir()) == []


def test_truncated_file_is_refused_naming_it(tmp_path):
    write_all(tmp_path)
    victim = tmp_path / "attention_recall.parquet"
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    with pytest.raises(S.TraceError, match="attention_recall.parquet.*truncated or corrupt"):
        S.read_traces(tmp_path)


def test_foreign_parquet_is_refused(tmp_path):
    write_all(tmp_path)
    pq.write_table(pa.table({"x": [1, 2]}), tmp_path / "foreign.parquet")
    with pytest.raises(S.TraceError, match="foreign.parquet: not a ditplan trace"):
        S.read_traces(tmp_path)


def _rewrite_version(path, version, extra_column=False):
    table = pq.read_table(path)
    if extra_column:
        table = table.append_column("new_stat", pa.array([1.0] * table.num_rows))
    pq.write_table(table.replace_schema_metadata(
        {**table.schema.metadata, S.META_SCHEMA_VERSION.encode(): version.encode()}), path)


def test_newer_major_is_refused_and_newer_minor_tolerated(tmp_path):
    write_all(tmp_path)
    path = tmp_path / "step_change.parquet"
    major, minor = S.parse_version(S.PROFILE_SCHEMA_VERSION, "test")
    _rewrite_version(path, f"{major}.{minor + 9}", extra_column=True)
    assert S.read_traces(tmp_path).tables["step_change"].schema.equals(S.STEP_CHANGE_SCHEMA)
    _rewrite_version(path, f"{major + 1}.0")
    with pytest.raises(S.TraceError, match="step_change.parquet.*newer.*upgrade ditplan"):
        S.read_traces(tmp_path)
    _rewrite_version(path, f"{major - 1}.3")
    with pytest.raises(S.TraceError, match="older.*re-run `ditplan profile`"):
        S.read_traces(tmp_path)


def test_wrong_column_type_is_refused(tmp_path):
    write_all(tmp_path)
    path = tmp_path / "step_change.parquet"
    table = pq.read_table(path)
    table = table.set_column(table.schema.get_field_index("rel_l1"), "rel_l1",
                             table["rel_l1"].cast(pa.float64()))
    pq.write_table(table, path)
    with pytest.raises(S.TraceError, match="'rel_l1' has type double, expected float"):
        S.read_traces(tmp_path)


def test_mixed_models_and_workloads_are_refused(tmp_path):
    write_all(tmp_path / "a")
    S.write_table(tmp_path / "a" / "other.parquet",
                  S.make_table("step_change", ROWS["step_change"]), meta(config_hash="zzz"))
    with pytest.raises(S.TraceError, match="own directory"):
        S.read_traces(tmp_path / "a")
    write_all(tmp_path / "b")
    S.write_table(tmp_path / "b" / "other.parquet",
                  S.make_table("step_change", ROWS["step_change"]), meta(steps=8))
    with pytest.raises(S.TraceError, match="one workload per trace directory"):
        S.read_traces(tmp_path / "b")


def test_missing_or_empty_directory(tmp_path):
    with pytest.raises(S.TraceError, match="no trace files.*ditplan profile"):
        S.read_traces(tmp_path / "absent")
    with pytest.raises(S.TraceError, match="no trace files"):
        S.read_traces(tmp_path)
