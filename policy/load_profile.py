"""Read a trace directory into dense per-layer numpy arrays for the compiler (no torch)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from ditplan.profiler.schema import (
    CONTEXTS,
    ERROR_COLUMNS,
    OUTPUT_LAYER,
    TraceError,
    TraceMetadata,
    read_traces,
)

REQUIRED_TABLES = ("attention_stats", "attention_recall", "step_change")
# Per-layer foreground statistics, each oriented so that larger means "attends to foreground".
FOREGROUND_FEATURES = ("r_attn", "log_fg_bg_mass_ratio")


@dataclass(frozen=True)
class Profile:
    """Trace statistics as arrays. L blocks (execution order), H heads, D densities, N samples
    (one per run, prompt, seed, step and CFG context), C contexts, T steps."""

    metadata: TraceMetadata
    trace_hash: str
    blocks: tuple[str, ...]
    contexts: tuple[str, ...]
    densities: np.ndarray  # [D]
    features: dict[str, np.ndarray]  # name -> [L], averaged over prompts, steps, heads, contexts
    recall_predicted: np.ndarray  # [L, H, D, N]
    recall_oracle: np.ndarray  # [L, H, D, N]
    kept_fraction: np.ndarray  # [D] mean share of block pairs the predicted mask keeps
    sample_step: np.ndarray  # [N]
    # [L, H, D, N, 2] relative output error at each density, dropped key blocks left out /
    # estimated; None when the traces record none (before schema 2.1, or without --output-error)
    output_error: np.ndarray | None
    residual_change: np.ndarray  # [C, L, T] mean rel-L1 of block residuals vs previous step
    output_change: np.ndarray  # [C, T] mean rel-L1 of the model output vs previous step

    @property
    def steps(self) -> int:
        return self.metadata.workload.steps


def load_profile(trace_dir: str | os.PathLike) -> Profile:
    """Read and check traces, then aggregate them per layer.

    Args:
        trace_dir: a directory written by ``ditplan profile``.
    Returns:
        the Profile arrays (shapes in the class docstring).
    """
    traces = read_traces(trace_dir)
    missing = [t for t in REQUIRED_TABLES if t not in traces.tables]
    if missing:
        raise TraceError(f"{trace_dir}: traces lack tables {missing}; re-run `ditplan profile`")
    meta = traces.metadata
    blocks = meta.model_config.blocks
    contexts = CONTEXTS if meta.workload.cfg else CONTEXTS[:1]
    stats, recall = traces.tables["attention_stats"], traces.tables["attention_recall"]
    change = traces.tables["step_change"]
    for name, table in (("attention_stats", stats), ("attention_recall", recall)):
        _check_keys(name, table, blocks, contexts, meta.workload.steps)
    _check_keys("step_change", change, (*blocks, OUTPUT_LAYER), contexts, meta.workload.steps)
    densities = np.asarray(meta.profiler_settings["densities"], dtype=np.float64)
    pred, oracle, kept, sample_step = _recall_arrays(recall, blocks, meta.model_config.num_heads,
                                                     densities)
    residual, output = _change_arrays(change, blocks, contexts, meta.workload.steps)
    error = None  # an empty table: profiled without --output-error
    if "attention_error" in traces.tables and traces.tables["attention_error"].num_rows:
        error = _error_array(traces.tables["attention_error"], blocks,
                             meta.model_config.num_heads, densities, sample_step)
    return Profile(
        metadata=meta, trace_hash=traces.content_hash, blocks=blocks, contexts=contexts,
        densities=densities, features=_layer_features(stats, blocks), recall_predicted=pred,
        recall_oracle=oracle, kept_fraction=kept, sample_step=sample_step, output_error=error,
        residual_change=residual, output_change=output,
    )


def _check_keys(name: str, table: pa.Table, layers, contexts, steps: int) -> None:
    found = set(table["layer"].unique().to_pylist())
    if found != set(layers):
        raise TraceError(
            f"table {name}: layers {sorted(found ^ set(layers))[:5]} are missing or unknown "
            f"(the model config lists {len(layers)}); re-profile the whole model"
        )
    ctx = set(table["cfg"].unique().to_pylist())
    if ctx != set(contexts):
        raise TraceError(f"table {name}: CFG contexts {sorted(ctx)}, workload needs {contexts}")
    step = np.asarray(table["step"])
    if step.min() < 0 or step.max() >= steps:
        raise TraceError(f"table {name}: steps outside 0..{steps - 1}; re-profile")


def _codes(table: pa.Table, column: str, values) -> np.ndarray:
    index = {v: i for i, v in enumerate(values)}
    return np.array([index[v] for v in table[column].to_pylist()], dtype=np.int64)


def _sample_index(table: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    run = np.asarray(table["run_id"].dictionary_encode().combine_chunks().indices)
    cfg = _codes(table, "cfg", CONTEXTS)
    cols = [run, table["prompt_index"], table["seed"], table["step"], cfg]
    keys = np.stack([np.asarray(c, dtype=np.int64) for c in cols], axis=1)
    uniq, inverse = np.unique(keys, axis=0, return_inverse=True)
    return inverse.reshape(-1), uniq[:, 3]


def _per_density_index(name: str, table: pa.Table, blocks, heads: int, densities: np.ndarray):
    """Each row's (layer, head, density) index in a per-density table (recall, error)."""
    layer = _codes(table, "layer", blocks)
    head = np.asarray(table["head"], dtype=np.int64)
    dens = np.asarray(table["density"], dtype=np.float64)
    d_idx = np.abs(dens[:, None] - densities[None, :]).argmin(axis=1)
    if np.abs(densities[d_idx] - dens).max() > 1e-4 or head.min() < 0 or head.max() >= heads:
        raise TraceError(f"{name}: densities or heads disagree with the file metadata")
    return layer, head, d_idx


def _recall_arrays(table: pa.Table, blocks, heads: int, densities: np.ndarray):
    layer, head, d_idx = _per_density_index("attention_recall", table, blocks, heads, densities)
    sample, sample_step = _sample_index(table)
    shape = (len(blocks), heads, len(densities), len(sample_step))
    pred, oracle = np.full(shape, np.nan), np.full(shape, np.nan)
    pred[layer, head, d_idx, sample] = np.asarray(table["recall_predicted"])
    oracle[layer, head, d_idx, sample] = np.asarray(table["recall_oracle"])
    if np.isnan(pred).any():
        raise TraceError("attention_recall: some (layer, head, density, step) rows are missing")
    n = len(densities)
    kept = np.bincount(d_idx, weights=np.asarray(table["kept_fraction"]), minlength=n)
    kept = kept / np.bincount(d_idx, minlength=n)
    return pred, oracle, kept, sample_step


def _error_array(table: pa.Table, blocks, heads: int, densities: np.ndarray,
                 sample_step: np.ndarray) -> np.ndarray:
    """attention_error as [L, H, D, N, 2], on the samples of attention_recall (same calls)."""
    layer, head, d_idx = _per_density_index("attention_error", table, blocks, heads, densities)
    sample, steps = _sample_index(table)
    if not np.array_equal(steps, sample_step):
        raise TraceError("attention_error: its calls differ from attention_recall's; re-profile")
    error = np.full((len(blocks), heads, len(densities), len(steps), 2), np.nan)
    for i, name in enumerate(ERROR_COLUMNS):
        error[layer, head, d_idx, sample, i] = np.asarray(table[name])
    if np.isnan(error).any():
        raise TraceError("attention_error: some (layer, head, density, step) rows are missing")
    return error


def _layer_features(table: pa.Table, blocks) -> dict[str, np.ndarray]:
    layer = _codes(table, "layer", blocks)
    count = np.bincount(layer, minlength=len(blocks))
    ratio = np.log(np.maximum(np.asarray(table["fg_bg_mass_ratio"], dtype=np.float64), 1e-6))
    columns = {"log_fg_bg_mass_ratio": ratio}
    for name in ("r_attn", "sink_mass", "text_mass", "entropy"):
        columns[name] = np.asarray(table[name], dtype=np.float64)
    return {k: np.bincount(layer, weights=v, minlength=len(blocks)) / count
            for k, v in columns.items()}


def _change_arrays(table: pa.Table, blocks, contexts, steps: int):
    names = (*blocks, OUTPUT_LAYER)
    layer, ctx = _codes(table, "layer", names), _codes(table, "cfg", contexts)
    step = np.asarray(table["step"], dtype=np.int64)
    flat = (ctx * len(names) + layer) * steps + step
    size = len(contexts) * len(names) * steps
    total = np.bincount(flat, weights=np.asarray(table["rel_l1"]), minlength=size)
    count = np.bincount(flat, minlength=size)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = (total / count).reshape(len(contexts), len(names), steps)
    if np.isnan(mean[:, :, 1:]).any():
        raise TraceError("step_change: some (context, layer, step >= 1) rows are missing")
    return mean[:, :-1, :], mean[:, -1, :]
