"""Row buffers of one prompt: device tensors per call, turned into columns with one host copy."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import torch

from ditplan.profiler.config import RecorderSettings
from ditplan.profiler.schema import ERROR_COLUMNS, OUTPUT_LAYER


class TraceRows:
    """Statistics recorded per (step, cfg, layer), kept as tensors until ``columns``.

    Keys of every table except run_id, prompt_index and seed, which the writer adds.
    """

    STATS = ("sink_mass", "text_mass", "entropy", "r_attn", "fg_bg_mass_ratio",
             "foreground_fraction")
    OUTPUT = OUTPUT_LAYER

    def __init__(self, settings: RecorderSettings):
        self.settings = settings
        self._attention: list[tuple[int, str, str]] = []
        self._stats: list[torch.Tensor] = []  # [H, len(STATS)] each
        self._recall: list[torch.Tensor] = []  # [H, D, 3] each: predicted, oracle, kept
        self._error: list[torch.Tensor] = []  # [H, D, 2] each: error dropped, estimated
        self._maps: list[tuple[int, str, str, torch.Tensor]] = []  # [H, Qb, Kb] each
        self._change: list[tuple[int, str, str]] = []
        self._change_values: list[torch.Tensor] = []  # [2] each: rel_l1, cos_dist

    def add_attention(self, step: int, cfg: str, layer: str, stats: torch.Tensor,
                      recall: torch.Tensor, error: torch.Tensor | None,
                      block_map: torch.Tensor | None) -> None:
        """One self-attention call: stats [H, 6], recall [H, D, 3], optional output error
        [H, D, 2] (output_error settings: every call or none), optional map [H, Qb, Kb]."""
        self._attention.append((step, cfg, layer))
        self._stats.append(stats.detach().float())
        self._recall.append(recall.detach().float())
        if error is not None:
            self._error.append(error.detach().float())
        if block_map is not None:
            self._maps.append((step, cfg, layer, block_map.detach().float()))

    def add_change(self, step: int, cfg: str, layer: str, values: torch.Tensor) -> None:
        """Step-to-step change of a block residual or of the output: values [2]."""
        self._change.append((step, cfg, layer))
        self._change_values.append(values.detach().float())

    def __len__(self) -> int:
        return len(self._attention) + len(self._change)

    def columns(self) -> dict[str, dict[str, object]]:
        """Table name -> columns (keys step, cfg, layer[, head] and the values), on the host."""
        tables = {"step_change": self._change_columns()}
        if self._attention:
            tables["attention_stats"] = self._stats_columns()
            tables["attention_recall"] = self._per_density_columns(
                self._recall, ("recall_predicted", "recall_oracle", "kept_fraction"))
        if self._error:
            tables["attention_error"] = self._per_density_columns(self._error, ERROR_COLUMNS)
        if self._maps:
            tables["attention_maps"] = self._map_columns()
        return tables

    def _stats_columns(self) -> dict[str, object]:
        stats = torch.stack(self._stats).cpu().numpy()  # [N, H, 6]
        n, heads, _ = stats.shape
        columns = _keys(self._attention, heads)
        columns["head"] = np.tile(np.arange(heads, dtype=np.int32), n)
        for i, name in enumerate(self.STATS):
            columns[name] = stats[:, :, i].reshape(-1)
        columns["r_attn_threshold"] = np.full(n * heads, self.settings.attn_threshold,
                                              dtype=np.float32)
        return columns

    def _per_density_columns(self, values: list[torch.Tensor],
                             names: tuple[str, ...]) -> dict[str, object]:
        """A row per (call, head, density) with one column per name (values [H, D, len])."""
        array = torch.stack(values).cpu().numpy()  # [N, H, D, len(names)]
        n, heads, dens, _ = array.shape
        columns = _keys(self._attention, heads * dens)
        columns["head"] = np.tile(np.repeat(np.arange(heads, dtype=np.int32), dens), n)
        columns["density"] = np.tile(np.asarray(self.settings.densities, np.float32), n * heads)
        for i, name in enumerate(names):
            columns[name] = array[..., i].reshape(-1)
        return columns

    def _map_columns(self) -> dict[str, object]:
        """A row per (map, head, query block). Maps may differ in size: a CFG branch's text
        length sets its block count (Qwen-Image's cond and uncond prompts)."""
        shapes = [tuple(m.shape) for *_, m in self._maps]  # (H, Qb, Kb) each
        values = torch.cat([m.flatten() for *_, m in self._maps]).cpu().numpy()
        rows = [h * q for h, q, _ in shapes]
        columns = _keys([key for *key, _ in self._maps], rows)
        columns["head"] = np.concatenate(
            [np.repeat(np.arange(h, dtype=np.int32), q) for h, q, _ in shapes])
        columns["q_block"] = np.concatenate(
            [np.tile(np.arange(q, dtype=np.int32), h) for h, q, _ in shapes])
        lengths = np.repeat([k for *_, k in shapes], rows)
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
        columns["mass"] = pa.ListArray.from_arrays(pa.array(offsets), pa.array(values))
        return columns

    def _change_columns(self) -> dict[str, object]:
        if not self._change:
            values = np.zeros((0, 2), dtype=np.float32)
        else:
            values = torch.stack(self._change_values).cpu().numpy()  # [N, 2]
        columns = _keys(self._change, 1)
        columns["rel_l1"], columns["cos_dist"] = values[:, 0], values[:, 1]
        return columns


def _keys(keys: list[tuple[int, str, str]], repeat: int | list[int]) -> dict[str, object]:
    """step, cfg and layer columns, each key repeated `repeat` times (one count, or one per
    key)."""
    counts = [repeat] * len(keys) if isinstance(repeat, int) else repeat
    steps = np.repeat(np.asarray([k[0] for k in keys], dtype=np.int32), counts)
    return {
        "step": steps,
        "cfg": [k[1] for k, n in zip(keys, counts, strict=True) for _ in range(n)],
        "layer": [k[2] for k, n in zip(keys, counts, strict=True) for _ in range(n)],
    }
