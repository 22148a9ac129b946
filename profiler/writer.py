"""Recorded rows -> schema tables -> one atomic Parquet file per table per (prompt, seed)."""

from __future__ import annotations

import logging
import platform
from importlib import metadata as importlib_metadata
from pathlib import Path

import numpy as np
import pyarrow as pa

from ditplan.profiler.rows import TraceRows
from ditplan.profiler.schema import TABLE_SCHEMAS, TraceMetadata, make_table, write_table

logger = logging.getLogger(__name__)

TRACE_DIR = "traces"
_LIBRARIES = ("ditplan", "torch", "diffusers", "pyarrow", "numpy", "scikit-learn")


def unit_name(prompt_index: int, seed: int) -> str:
    """The file stem of one (prompt, seed): 'p0003-s42'."""
    return f"p{prompt_index:04d}-s{seed}"


def unit_paths(out_dir: Path, name: str, tables: tuple[str, ...]) -> dict[str, Path]:
    """Table name -> out_dir/traces/<table>/<unit>.parquet."""
    return {table: Path(out_dir) / TRACE_DIR / table / f"{name}.parquet" for table in tables}


def build_tables(rows: TraceRows, *, run_id: str, prompt_index: int, seed: int,
                 step_offset: int = 0) -> dict[str, pa.Table]:
    """The rows of one (prompt, seed) as schema tables (every table, possibly empty).

    Args:
        rows: what a ProfileRecorder recorded for this prompt and seed.
        run_id, prompt_index, seed: the key columns the recorder does not know.
        step_offset: subtracted from the recorded steps (an expert's traces number its
            steps from its first, profiler.experts).

    Returns:
        table name -> pa.Table matching schema.TABLE_SCHEMAS exactly.
    """
    recorded = rows.columns()
    tables = {}
    for name in TABLE_SCHEMAS:
        columns = recorded.get(name) or _empty_columns(name)
        n = len(columns["step"])
        keys = {"run_id": [run_id] * n, "prompt_index": np.full(n, prompt_index, np.int32),
                "seed": np.full(n, seed, np.int64),
                "step": np.asarray(columns["step"], np.int32) - step_offset}
        tables[name] = make_table(name, {**columns, **keys})
    return tables


def _empty_columns(name: str) -> dict[str, list]:
    return {field.name: [] for field in TABLE_SCHEMAS[name]
            if field.name not in ("run_id", "prompt_index", "seed")}


def write_unit(out_dir: Path, name: str, tables: dict[str, pa.Table],
               metadata: TraceMetadata) -> list[Path]:
    """Write each table of one (prompt, seed) atomically (schema.write_table); returns paths."""
    paths = unit_paths(out_dir, name, tuple(tables))
    written = [write_table(paths[t], table, metadata) for t, table in tables.items()]
    logger.debug("wrote %d tables of %s", len(written), name)
    return written


def library_versions() -> dict[str, str]:
    """Versions of the libraries that shape the numbers, plus Python's."""
    versions = {"python": platform.python_version()}
    for name in _LIBRARIES:
        try:
            versions[name] = importlib_metadata.version(name)
        except importlib_metadata.PackageNotFoundError:
            versions[name] = "unknown"
    return versions
