"""report.png: a one-page summary of a trace folder (R_attn, recall curves, step change, a map)."""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ditplan.profiler.schema import OUTPUT_LAYER, read_traces

logger = logging.getLogger(__name__)


def _mean_by(table: pa.Table, keys: list[str], value: str) -> dict[tuple, float]:
    grouped = table.group_by(keys).aggregate([(value, "mean")])
    columns = [grouped[k].to_pylist() for k in keys]
    return dict(zip(zip(*columns, strict=True), grouped[f"{value}_mean"].to_pylist(),
                    strict=True))


def layer_foreground(stats: pa.Table, blocks: tuple[str, ...]) -> np.ndarray:
    """[3, L] per block, averaged over heads, steps and prompts: R_attn, log10 fg/bg mass
    ratio, and the foreground share of tokens (R_attn's chance level)."""
    with_log = stats.append_column("log_ratio", pc.log10(pc.max_element_wise(
        stats["fg_bg_mass_ratio"].cast(pa.float64()), 1e-6)))
    means = [_mean_by(with_log, ["layer"], v)
             for v in ("r_attn", "log_ratio", "foreground_fraction")]
    return np.array([[m.get((b,), np.nan) for b in blocks] for m in means])


def recall_curves(recall: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    """Densities [D] and [3, D]: mean predicted recall, oracle recall, kept fraction."""
    means = [_mean_by(recall, ["density"], v)
             for v in ("recall_predicted", "recall_oracle", "kept_fraction")]
    densities = np.array(sorted(k[0] for k in means[0]))
    return densities, np.array([[m[(d,)] for d in densities] for m in means])


def change_heatmap(change: pa.Table, blocks: tuple[str, ...], steps: int) -> np.ndarray:
    """[L + 1, steps]: mean rel-L1 change per block (and the output, last row) per step."""
    means = _mean_by(change, ["layer", "step"], "rel_l1")
    grid = np.full((len(blocks) + 1, steps), np.nan)
    for row, layer in enumerate((*blocks, OUTPUT_LAYER)):
        for step in range(steps):
            grid[row, step] = means.get((layer, step), np.nan)
    return grid


def write_report(trace_dir: str | os.PathLike, path: str | os.PathLike) -> Path:
    """Draw the report of the traces under ``trace_dir`` into ``path`` (PNG, atomic).

    Args:
        trace_dir: a folder written by ``ditplan profile``.
        path: the image to write.

    Returns:
        the written path.
    """
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    traces = read_traces(trace_dir)
    meta = traces.metadata
    blocks = meta.model_config.blocks
    fig, axes = plt.subplots(2, 2, figsize=(13, 9), constrained_layout=True)
    _plot_foreground(axes[0, 0], layer_foreground(traces.tables["attention_stats"], blocks))
    _plot_recall(axes[0, 1], *recall_curves(traces.tables["attention_recall"]))
    _plot_change(fig, axes[1, 0], change_heatmap(traces.tables["step_change"], blocks,
                                                  meta.workload.steps))
    _plot_map(fig, axes[1, 1], traces.tables.get("attention_maps"), blocks)
    work = meta.workload
    fig.suptitle(f"{meta.fingerprint.transformer_class} · {work.frames}x{work.height}x"
                 f"{work.width}, {work.steps} steps, tokens {work.tokens_grid} · run "
                 f"{meta.run_id} · {len(traces.run_ids)} run(s)")
    return _save_atomic(fig, Path(path))


def _plot_foreground(ax, values: np.ndarray) -> None:
    index = np.arange(values.shape[1])
    ax.bar(index, values[0], color="tab:orange", label="R_attn")
    ax.plot(index, values[2], "_", color="tab:blue", markersize=14, mew=2,
            label="chance (foreground share)")
    twin = ax.twinx()
    twin.plot(index, values[1], "k.-", label="log10 fg/bg mass per token")
    twin.axhline(0, color="grey", lw=0.5)
    ax.set(xlabel="block", ylabel="R_attn: high-attention tokens that are foreground",
           title="Foreground focus per block", ylim=(0, 1), xticks=index)
    twin.set_ylabel("log10 fg/bg mass ratio")
    ax.legend(loc="upper left", fontsize=8)
    twin.legend(loc="upper right", fontsize=8)


def _plot_recall(ax, densities: np.ndarray, curves: np.ndarray) -> None:
    ax.plot(densities, curves[0], "o-", label="block-mean predicted mask")
    ax.plot(densities, curves[1], "s--", label="oracle (true top blocks)")
    ax.plot(densities, curves[2], ":", color="grey", label="kept share of block pairs")
    ax.set(xlabel="nominal density (key blocks kept per row)", ylabel="attention mass kept",
           title="Recall vs density (mean over layers, heads, steps)", ylim=(0, 1.02))
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)


def _integer_locator():
    from matplotlib.ticker import MaxNLocator

    return MaxNLocator(integer=True)


def _plot_change(fig, ax, grid: np.ndarray) -> None:
    image = ax.imshow(grid, aspect="auto", cmap="magma", interpolation="nearest")
    rows = grid.shape[0]
    ax.set_yticks(range(rows), [*map(str, range(rows - 1)), "output"])
    ax.set(xlabel="step", ylabel="block",
           title="Step-to-step change (rel. L1 of residual vs previous step)")
    ax.xaxis.set_major_locator(_integer_locator())
    fig.colorbar(image, ax=ax)


def _plot_map(fig, ax, maps: pa.Table | None, blocks: tuple[str, ...]) -> None:
    if maps is None or maps.num_rows == 0:
        ax.set_axis_off()
        ax.text(0.5, 0.5, "no attention maps recorded", ha="center")
        return
    layer = blocks[len(blocks) // 2]
    rows = maps.filter(pc.and_(pc.equal(maps["layer"], layer), pc.equal(maps["head"], 0)))
    last = rows.filter(pc.equal(rows["step"], pc.max(rows["step"])))
    key = {k: last[k][0] for k in ("prompt_index", "seed", "cfg")}
    first = last.filter(pc.and_(pc.and_(pc.equal(last["prompt_index"], key["prompt_index"]),
                                        pc.equal(last["seed"], key["seed"])),
                                pc.equal(last["cfg"], key["cfg"])))
    order = np.argsort(first["q_block"].to_numpy())
    matrix = np.array(first["mass"].to_pylist())[order]
    image = ax.imshow(matrix, cmap="viridis", interpolation="nearest")
    for axis in (ax.xaxis, ax.yaxis):
        axis.set_major_locator(_integer_locator())
    ax.set(xlabel="key block", ylabel="query block",
           title=f"{layer} head 0, step {first['step'][0]}: block-pooled attention")
    fig.colorbar(image, ax=ax)


def _save_atomic(fig, path: Path) -> Path:
    from matplotlib import pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp.png", dir=path.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=110)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    finally:
        plt.close(fig)
    logger.info("wrote %s", path)
    return path
