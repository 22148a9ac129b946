"""The trace contract (pyarrow only): Parquet table schemas, file metadata, atomic write, reader.

The profiler writes these tables and the policy compiler reads them; nothing here imports torch.
Every table is long and tidy, keyed by ``run_id, prompt_index, seed, step, cfg, layer`` (and
``head`` where the statistic is per head). ``layer`` is a block's fully-qualified module name
("blocks.3"); the model output uses the reserved name ``OUTPUT_LAYER``. ``cfg`` is "cond" or
"uncond" (a run without classifier-free guidance only has "cond").
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

logger = logging.getLogger(__name__)

PROFILE_SCHEMA_VERSION = "2.1"
CONTEXTS = ("cond", "uncond")
DENSITY_GRID = (0.05, 0.1, 0.2, 0.3, 0.5)
OUTPUT_LAYER = "__output__"

# File-metadata keys (Parquet key/value metadata; every value is UTF-8 text, JSON where noted).
META_SCHEMA_VERSION = "ditplan.schema_version"  # "major.minor"
META_TABLE = "ditplan.table"  # one of TABLE_SCHEMAS' names
META_RUN_ID = "ditplan.run_id"
META_FINGERPRINT = "ditplan.model_fingerprint"  # JSON ModelFingerprint
META_MODEL_CONFIG = "ditplan.model_config"  # JSON ModelConfig
META_WORKLOAD = "ditplan.workload"  # JSON Workload
META_PROFILER_SETTINGS = "ditplan.profiler_settings"  # JSON object, REQUIRED_SETTINGS at least
META_LIBRARY_VERSIONS = "ditplan.library_versions"  # JSON {"torch": "2.13.0", ...}
METADATA_KEYS = (
    META_SCHEMA_VERSION, META_TABLE, META_RUN_ID, META_FINGERPRINT, META_MODEL_CONFIG,
    META_WORKLOAD, META_PROFILER_SETTINGS, META_LIBRARY_VERSIONS,
)
# Profiler settings the compiler depends on; files that disagree on them cannot be mixed.
REQUIRED_SETTINGS = ("block_size", "tile", "densities", "sink")


def _f32(name: str) -> pa.Field:
    return pa.field(name, pa.float32(), nullable=False)


KEY_FIELDS = (
    pa.field("run_id", pa.string(), nullable=False),
    pa.field("prompt_index", pa.int32(), nullable=False),
    pa.field("seed", pa.int64(), nullable=False),
    pa.field("step", pa.int32(), nullable=False),
    pa.field("cfg", pa.string(), nullable=False),
    pa.field("layer", pa.string(), nullable=False),
)
HEAD_FIELD = pa.field("head", pa.int32(), nullable=False)

# Per head, per step: the foreground and concentration statistics of self-attention.
ATTENTION_STATS_SCHEMA = pa.schema([
    *KEY_FIELDS, HEAD_FIELD,
    _f32("sink_mass"),  # share of attention mass on first-frame key blocks, in [0, 1]
    _f32("text_mass"),  # share on text key blocks (0 without joint attention), in [0, 1]
    _f32("entropy"),  # mean over query tokens of row entropy / ln(key tokens), in [0, 1]
    _f32("r_attn"),  # |high-attention tokens that are foreground| / |high-attention tokens|
    _f32("r_attn_threshold"),  # token j is high-attention if mean_i A_ij > threshold / S_k
    _f32("fg_bg_mass_ratio"),  # mean mass received per fg key token / per bg key token
    _f32("foreground_fraction"),  # share of video tokens that are foreground
])
# Per head, per step, per density: how much attention mass a block mask of that density keeps.
ATTENTION_RECALL_SCHEMA = pa.schema([
    *KEY_FIELDS, HEAD_FIELD,
    _f32("density"),  # share of all block pairs kept, forced ones included (DENSITY_GRID; 2.0)
    _f32("recall_predicted"),  # mass share kept by the block-mean-predicted mask (+ sink)
    _f32("recall_oracle"),  # mass share kept by the true top blocks (same count, + sink)
    _f32("kept_fraction"),  # share of block pairs the predicted mask really keeps
])
# Per head, per step, per density (schema 2.1): relative error of the sparse attention output
# against dense, ||out - dense|| / ||dense||, with the block-mean-predicted mask of that density.
ATTENTION_ERROR_SCHEMA = pa.schema([
    *KEY_FIELDS, HEAD_FIELD,
    _f32("density"),  # as in attention_recall
    _f32("error_dropped"),  # dropped key blocks left out (plain block-sparse attention)
    _f32("error_estimated"),  # dropped key blocks estimated from their mean key and value
])
ERROR_COLUMNS = ("error_dropped", "error_estimated")  # attention_error's values, in this order
# Block-pooled attention maps for sampled steps: one row per query block, never S x S.
ATTENTION_MAP_SCHEMA = pa.schema([
    *KEY_FIELDS, HEAD_FIELD,
    pa.field("q_block", pa.int32(), nullable=False),
    # mass[k] = attention mass from this query block's tokens to key block k, averaged over the
    # query tokens (each row sums to 1); length = number of key blocks
    pa.field("mass", pa.list_(pa.field("item", pa.float32(), nullable=False)), nullable=False),
])
# Step-to-step change of each block's residual (out - in) and of the model output
# (layer == OUTPUT_LAYER): step s compares step s with step s - 1, so steps start at 1.
STEP_CHANGE_SCHEMA = pa.schema([*KEY_FIELDS, _f32("rel_l1"), _f32("cos_dist")])

TABLE_SCHEMAS = {
    "attention_stats": ATTENTION_STATS_SCHEMA,
    "attention_recall": ATTENTION_RECALL_SCHEMA,
    "attention_error": ATTENTION_ERROR_SCHEMA,
    "attention_maps": ATTENTION_MAP_SCHEMA,
    "step_change": STEP_CHANGE_SCHEMA,
}


class TraceError(ValueError):
    """A trace file or directory is missing, corrupt, foreign, too new, or mixes models."""


@dataclass(frozen=True)
class ModelFingerprint:
    """Which transformer the traces describe (the plan's identity is built from it)."""

    transformer_class: str
    config_hash: str
    weights_hash: str | None = None


@dataclass(frozen=True)
class ModelConfig:
    """What the cost model and the compiler need to know about the transformer.

    ``blocks`` lists block FQNs in execution order; ``self_attention`` maps each block to its
    self-attention module FQN ("blocks.3" -> "blocks.3.attn1").
    """

    num_layers: int
    num_heads: int
    head_dim: int
    ffn_dim: int
    patch_size: tuple[int, int, int]
    text_len: int
    cross_attention: bool
    joint_attention: bool
    blocks: tuple[str, ...]
    self_attention: dict[str, str]

    def __post_init__(self):
        object.__setattr__(self, "patch_size", tuple(self.patch_size))
        object.__setattr__(self, "blocks", tuple(self.blocks))
        if len(self.blocks) != self.num_layers or set(self.self_attention) != set(self.blocks):
            raise TraceError(
                "model config: 'blocks' must list num_layers block names and 'self_attention' "
                "must map exactly those blocks to their self-attention module names"
            )


@dataclass(frozen=True)
class Workload:
    """The generation the traces were recorded at; ``tokens_grid`` is (frames, height, width)."""

    steps: int
    height: int
    width: int
    frames: int
    guidance_scale: float
    cfg: bool
    tokens_grid: tuple[int, int, int]
    # The scheduler's sigma at each step [steps] (traces from before 2026-11-30 lack it: None)
    sigmas: tuple[float, ...] | None = None

    def __post_init__(self):
        object.__setattr__(self, "tokens_grid", tuple(self.tokens_grid))
        if self.sigmas is not None:
            object.__setattr__(self, "sigmas", tuple(float(s) for s in self.sigmas))

    @property
    def num_tokens(self) -> int:
        f, h, w = self.tokens_grid
        return f * h * w


@dataclass(frozen=True)
class TraceMetadata:
    """The file-level metadata every trace file carries (same for all tables of one run)."""

    run_id: str
    fingerprint: ModelFingerprint
    model_config: ModelConfig
    workload: Workload
    profiler_settings: dict
    library_versions: dict = field(default_factory=dict)

    def to_parquet(self, table_name: str) -> dict[str, str]:
        """Args: table_name: a TABLE_SCHEMAS key. Returns: the Parquet key/value metadata."""
        missing = [k for k in REQUIRED_SETTINGS if k not in self.profiler_settings]
        if missing:
            raise TraceError(f"profiler_settings lacks {missing}; the compiler needs them")
        return {
            META_SCHEMA_VERSION: PROFILE_SCHEMA_VERSION,
            META_TABLE: table_name,
            META_RUN_ID: self.run_id,
            META_FINGERPRINT: _dump(asdict(self.fingerprint)),
            META_MODEL_CONFIG: _dump(asdict(self.model_config)),
            META_WORKLOAD: _dump(asdict(self.workload)),
            META_PROFILER_SETTINGS: _dump(self.profiler_settings),
            META_LIBRARY_VERSIONS: _dump(self.library_versions),
        }

    @classmethod
    def from_parquet(cls, meta: dict[str, str], path: Path) -> TraceMetadata:
        """Parse file metadata (already schema-version checked); TraceError names ``path``."""
        try:
            return cls(
                run_id=meta[META_RUN_ID],
                fingerprint=ModelFingerprint(**json.loads(meta[META_FINGERPRINT])),
                model_config=ModelConfig(**json.loads(meta[META_MODEL_CONFIG])),
                workload=Workload(**json.loads(meta[META_WORKLOAD])),
                profiler_settings=json.loads(meta[META_PROFILER_SETTINGS]),
                library_versions=json.loads(meta.get(META_LIBRARY_VERSIONS, "{}")),
            )
        except (KeyError, TypeError, ValueError) as exc:
            msg = f"{path}: broken ditplan trace metadata ({exc!r}); re-profile"
            raise TraceError(msg) from exc


def _dump(obj) -> str:
    return json.dumps(obj, sort_keys=True)


def table_name_of(schema: pa.Schema) -> str:
    """Returns the TABLE_SCHEMAS name whose schema equals ``schema`` (metadata ignored)."""
    for name, expected in TABLE_SCHEMAS.items():
        if schema.remove_metadata().equals(expected):
            return name
    raise TraceError(
        f"table schema matches none of {sorted(TABLE_SCHEMAS)}; build tables with "
        f"make_table(name, columns) so the column names, types and nullability match"
    )


def make_table(name: str, columns: dict[str, list]) -> pa.Table:
    """Build one trace table from Python/numpy columns, cast to the contract's types.

    Args:
        name: a TABLE_SCHEMAS key.
        columns: column name -> values (every schema column, equal lengths).
    Returns:
        a ``pa.Table`` whose schema equals ``TABLE_SCHEMAS[name]``.
    """
    schema = TABLE_SCHEMAS[name]
    missing = sorted(set(schema.names) - set(columns))
    extra = sorted(set(columns) - set(schema.names))
    if missing or extra:
        raise TraceError(f"table {name!r}: missing columns {missing}, unknown columns {extra}")
    return pa.Table.from_pydict({n: columns[n] for n in schema.names}, schema=schema)


def write_table(path: str | os.PathLike, table: pa.Table, metadata: TraceMetadata) -> Path:
    """Write one trace table to Parquet atomically (temp file in the same folder + os.replace).

    Args:
        path: destination ``.parquet`` file; its folder is created if needed.
        table: a table whose schema equals one of TABLE_SCHEMAS (see ``make_table``).
        metadata: run-level metadata stored in the file's key/value metadata.
    Returns:
        the written path.
    """
    path = Path(path)
    name = table_name_of(table.schema)
    runs = set(table.column("run_id").unique().to_pylist())
    if runs - {metadata.run_id}:
        raise TraceError(f"rows carry run_id {sorted(runs)} but metadata says {metadata.run_id!r}")
    table = table.replace_schema_metadata(metadata.to_parquet(name))
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        pq.write_table(table, tmp, row_group_size=1 << 16)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def parse_version(text: str, what: str) -> tuple[int, int]:
    """Parse "major.minor"; raise TraceError naming ``what`` when malformed."""
    match = re.fullmatch(r"([0-9]+)\.([0-9]+)", str(text))
    if match is None:
        raise TraceError(f"{what}: schema version {text!r} is not 'major.minor'")
    return int(match[1]), int(match[2])


@dataclass(frozen=True)
class Traces:
    """All trace tables of one directory: one model, one workload, one profiler setting."""

    metadata: TraceMetadata  # of the first file; fingerprint/workload/settings shared by all
    tables: dict[str, pa.Table]  # table name -> rows of every file, in sorted file order
    files: tuple[Path, ...]
    content_hash: str  # sha256 over the files' contents (independent of their names and order)

    @property
    def run_ids(self) -> tuple[str, ...]:
        return tuple(sorted({r for t in self.tables.values() for r in t["run_id"].to_pylist()}))


def read_traces(directory: str | os.PathLike) -> Traces:
    """Read and check every ``*.parquet`` trace under ``directory`` (recursively).

    Refuses, with a TraceError naming the file: a missing or empty directory, truncated or corrupt
    Parquet, Parquet without ditplan metadata, a newer (or older) schema major, wrong column types,
    and files that mix models, workloads or profiler settings. A newer minor is tolerated: its
    extra columns are dropped.

    Args:
        directory: a folder written by ``ditplan profile``.
    Returns:
        the merged tables with their shared metadata.
    """
    directory = Path(directory)
    files = sorted(directory.rglob("*.parquet")) if directory.is_dir() else []
    if not files:
        raise TraceError(
            f"no trace files (*.parquet) under {directory}; run `ditplan profile --out "
            f"{directory}` first"
        )
    parts: dict[str, list[pa.Table]] = {}
    first: TraceMetadata | None = None
    digests = []
    for path in files:
        name, table, meta = _read_one(path)
        first = first or meta
        _check_same_source(first, meta, path, files[0])
        parts.setdefault(name, []).append(table)
        digests.append(hashlib.sha256(path.read_bytes()).hexdigest())
    tables = {name: pa.concat_tables(ts) for name, ts in sorted(parts.items())}
    content_hash = hashlib.sha256("".join(sorted(digests)).encode()).hexdigest()
    return Traces(metadata=first, tables=tables, files=tuple(files), content_hash=content_hash)


def _read_one(path: Path) -> tuple[str, pa.Table, TraceMetadata]:
    try:
        parquet = pq.ParquetFile(path)
        raw = parquet.schema_arrow.metadata or {}
    except (pa.ArrowException, OSError) as exc:
        raise TraceError(
            f"{path}: not a readable Parquet file ({exc}); it is truncated or corrupt, "
            f"delete it and re-run `ditplan profile` (finished prompts are skipped)"
        ) from exc
    meta = {k.decode(errors="replace"): v.decode(errors="replace") for k, v in raw.items()}
    if META_SCHEMA_VERSION not in meta or meta.get(META_TABLE) not in TABLE_SCHEMAS:
        raise TraceError(
            f"{path}: not a ditplan trace (no {META_SCHEMA_VERSION!r}/{META_TABLE!r} metadata); "
            f"keep only `ditplan profile` output in the trace directory"
        )
    _check_version(meta[META_SCHEMA_VERSION], path)
    name = meta[META_TABLE]
    try:
        table = parquet.read()
    except (pa.ArrowException, OSError) as exc:
        raise TraceError(f"{path}: corrupt Parquet data ({exc}); delete it and re-profile") from exc
    return name, _conform(table, name, path), TraceMetadata.from_parquet(meta, path)


def _check_version(text: str, path: Path) -> None:
    major, minor = parse_version(text, str(path))
    ours_major, ours_minor = parse_version(PROFILE_SCHEMA_VERSION, "ditplan")
    if major > ours_major:
        raise TraceError(
            f"{path}: trace schema {text} is newer than this ditplan reads "
            f"({PROFILE_SCHEMA_VERSION}); upgrade ditplan"
        )
    if major < ours_major:
        raise TraceError(
            f"{path}: trace schema {text} is older than this ditplan reads "
            f"({PROFILE_SCHEMA_VERSION}); re-run `ditplan profile` with this version"
        )
    if minor > ours_minor:
        logger.debug("%s: newer minor schema %s, extra columns ignored", path, text)


def _conform(table: pa.Table, name: str, path: Path) -> pa.Table:
    expected = TABLE_SCHEMAS[name]
    for fld in expected:
        if fld.name not in table.column_names:
            raise TraceError(f"{path}: table {name!r} lacks column {fld.name!r}; re-profile")
        if not table.schema.field(fld.name).type.equals(fld.type):
            raise TraceError(
                f"{path}: column {fld.name!r} has type {table.schema.field(fld.name).type}, "
                f"expected {fld.type}; re-profile"
            )
        if table.column(fld.name).null_count:
            raise TraceError(f"{path}: column {fld.name!r} has nulls; re-profile")
    return table.select(expected.names).cast(expected)


def _check_same_source(first: TraceMetadata, meta: TraceMetadata, path: Path, ref: Path) -> None:
    if meta.fingerprint != first.fingerprint or meta.model_config != first.model_config:
        raise TraceError(
            f"{path} profiles model {meta.fingerprint} but {ref} profiles "
            f"{first.fingerprint}; put each model's traces in its own directory"
        )
    if meta.workload != first.workload:
        raise TraceError(
            f"{path} was recorded at workload {meta.workload} but {ref} at {first.workload}; "
            f"a plan is per workload, so keep one workload per trace directory"
        )
    ours = {k: first.profiler_settings[k] for k in REQUIRED_SETTINGS}
    theirs = {k: meta.profiler_settings.get(k) for k in REQUIRED_SETTINGS}
    if ours != theirs:
        raise TraceError(f"{path}: profiler settings {theirs} differ from {ref}'s {ours}; "
                         f"re-profile into one directory with one setting")
