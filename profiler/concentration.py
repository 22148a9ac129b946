"""How concentrated attention is: mass in the top blocks (oracle and block-mean-predicted) per
layer at early, middle and late steps, from a trace's attention_recall table."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

PHASES = ("early", "middle", "late")


@dataclass(frozen=True)
class Concentration:
    """Mean top-block mass per layer and step phase, averaged over heads, CFG branches, prompts
    and seeds. oracle/predicted: [L, 3] (phases early, middle, late), in [0, 1]; head_oracle:
    [L, H], each head's oracle mass over every step (a layer's mean can hide diffuse heads)."""

    density: float
    layers: tuple[str, ...]
    oracle: np.ndarray
    predicted: np.ndarray
    phase_steps: tuple[tuple[int, int], ...]  # inclusive (first, last) step of each phase
    head_oracle: np.ndarray

    def as_dict(self) -> dict:
        spans = dict(zip(PHASES, self.phase_steps, strict=True))
        return {"density": self.density, "phase_steps": spans,
                "layers": {layer: {phase: {"oracle": float(self.oracle[i, j]),
                                           "predicted": float(self.predicted[i, j])}
                                   for j, phase in enumerate(PHASES)}
                           for i, layer in enumerate(self.layers)},
                "head_oracle": {layer: [float(m) for m in self.head_oracle[i]]
                                for i, layer in enumerate(self.layers)}}

    def markdown(self) -> str:
        head = " | ".join(f"{p} oracle | {p} predicted" for p in PHASES)
        lines = [f"| layer | {head} | heads, oracle, all steps |",
                 "|---" * (2 + 2 * len(PHASES)) + "|"]
        for i, layer in enumerate(self.layers):
            cells = " | ".join(f"{self.oracle[i, j]:.3f} | {self.predicted[i, j]:.3f}"
                               for j in range(len(PHASES)))
            heads = " ".join(f"{m:.2f}" for m in self.head_oracle[i])
            lines.append(f"| {layer} | {cells} | {heads} |")
        return "\n".join(lines)


def attention_concentration(recall: pa.Table, layers: tuple[str, ...],
                            density: float = 0.2) -> Concentration:
    """Top-`density` block mass per layer and phase from an attention_recall table.

    The steps present are split into three equal runs (early, middle, late). A trace recorded
    with the first-frame sink forced on counts the sink blocks as kept; record with --no-sink for
    the pure top-block share.

    Raises:
        ValueError: if the table has no rows at `density` or lacks a layer of `layers`.
    """
    rows = recall.filter(pc.less(pc.abs(pc.subtract(recall["density"], density)), 1e-6))
    if rows.num_rows == 0:
        have = sorted({round(d, 4) for d in recall["density"].to_pylist()})
        raise ValueError(f"the trace has no recall rows at density {density}; it has {have}")
    steps = np.array(sorted(set(rows["step"].to_pylist())))
    phases = np.array_split(steps, len(PHASES))
    oracle, predicted = np.zeros((len(layers), 3)), np.zeros((len(layers), 3))
    for j, phase in enumerate(phases):
        part = rows.filter(pc.is_in(rows["step"], pa.array(phase.tolist(), pa.int32())))
        for i, layer in enumerate(layers):
            one = part.filter(pc.equal(part["layer"], layer))
            if one.num_rows == 0:
                raise ValueError(f"the trace has no recall rows for layer {layer!r}")
            oracle[i, j] = pc.mean(one["recall_oracle"]).as_py()
            predicted[i, j] = pc.mean(one["recall_predicted"]).as_py()
    spans = tuple((int(p[0]), int(p[-1])) for p in phases)
    return Concentration(density, tuple(layers), oracle, predicted, spans,
                         _head_means(rows, layers))


def _head_means(rows: pa.Table, layers: tuple[str, ...]) -> np.ndarray:
    """[L, H]: each head's mean oracle mass over the rows (every step, branch, prompt)."""
    means = rows.group_by(["layer", "head"]).aggregate([("recall_oracle", "mean")])
    heads = int(pc.max(means["head"]).as_py()) + 1
    out = np.full((len(layers), heads), np.nan)
    index = {layer: i for i, layer in enumerate(layers)}
    for layer, head, mean in zip(means["layer"].to_pylist(), means["head"].to_pylist(),
                                 means["recall_oracle_mean"].to_pylist(), strict=True):
        if layer in index:
            out[index[layer], head] = mean
    return out
