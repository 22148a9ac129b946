"""Draw a plan as a PNG: blocks x steps per CFG context, coloured by action, shaded by density."""

from __future__ import annotations

import io
import os
from pathlib import Path

from ditplan.policy.atomic import atomic_write_bytes
from ditplan.policy.plan import COMPUTE, FORECAST, REUSE, AttentionSpec, Plan

COLOURS = {COMPUTE: (0.12, 0.34, 0.70), REUSE: (0.93, 0.55, 0.13), FORECAST: (0.20, 0.63, 0.30)}
LABELS = {COMPUTE: "compute", REUSE: "reuse cached", FORECAST: "forecast (Taylor)"}
LIGHTEST = 0.2  # share of the compute colour at density -> 0 (mass-threshold layers use it too)
DPI = 100
CELL_IN, MARGIN_W_IN, MARGIN_H_IN, PANEL_EXTRA_IN = 0.22, 3.2, 1.4, 0.6


def figure_inches(plan: Plan) -> tuple[float, float]:
    """(width, height) of the drawing in inches; times ``DPI`` gives its pixel size."""
    steps, blocks = plan.workload.steps, len(plan.block_order)
    panels = len(plan.workload.contexts)
    width = MARGIN_W_IN + CELL_IN * max(steps, 12)
    height = MARGIN_H_IN + panels * (PANEL_EXTRA_IN + CELL_IN * max(blocks, 4))
    return width, height


def density_at(spec: AttentionSpec, step: int) -> float:
    """Attention density of a layer at ``step``: 1 on dense steps; 0 when set by mass threshold."""
    if spec.dense_at(step):
        return 1.0
    return spec.density if spec.density is not None else 0.0


def _shade(colour: tuple[float, float, float], density: float) -> tuple[float, ...]:
    strength = LIGHTEST + (1.0 - LIGHTEST) * density
    return tuple(1.0 - strength * (1.0 - c) for c in colour)


def cell_colours(plan: Plan, context: str) -> list[list[tuple[float, ...]]]:
    """RGB per [block][step] of one context: the action's colour; compute shaded by density."""
    rows = []
    for block in plan.block_order:
        run = plan.run_of(block)
        actions = run.actions(context) if run else COMPUTE * plan.workload.steps
        spec = plan.layers[block].attention
        rows.append([_shade(COLOURS[COMPUTE], density_at(spec, s)) if a == COMPUTE
                     else COLOURS[a] for s, a in enumerate(actions)])
    return rows


def title(plan: Plan) -> str:
    """The figure title: model, workload, predicted and (when calibrated) measured speed."""
    w, prov = plan.workload, plan.provenance
    text = (f"{plan.identity.transformer_class}, {w.steps} steps, "
            f"{'CFG ' + format(w.guidance_scale, 'g') if w.cfg else 'no CFG'}: "
            f"predicted {prov.predicted_speedup:.2f}x")
    cal = prov.calibration
    if cal is not None:
        text += (f"\nmeasured {cal.speedup:.2f}x, PSNR {cal.psnr_db:.1f} dB vs dense "
                 f"({cal.device}, {cal.prompts} prompts)")
    return text


def _row_label(plan: Plan, block: str) -> str:
    spec = plan.layers[block].attention
    return block if spec.density is not None else f"{block} (mass>={spec.mass_threshold:g})"


def _draw_panel(ax, plan: Plan, context: str) -> None:
    ax.imshow(cell_colours(plan, context), aspect="auto", interpolation="nearest")
    steps, blocks = plan.workload.steps, plan.block_order
    ax.set_title(context, fontsize=9, loc="left")
    ax.set_xticks(range(steps))
    ax.set_xticklabels([str(s) if s % 5 == 0 else "" for s in range(steps)], fontsize=7)
    ax.set_yticks(range(len(blocks)))
    ax.set_yticklabels([_row_label(plan, b) for b in blocks], fontsize=7)
    ax.set_xticks([s - 0.5 for s in range(1, steps)], minor=True)
    ax.set_yticks([b - 0.5 for b in range(1, len(blocks))], minor=True)
    ax.grid(which="minor", color="white", linewidth=0.6)
    ax.tick_params(which="minor", length=0)
    ax.set_xlabel("denoising step", fontsize=8)


def render_png(plan: Plan) -> bytes:
    """The plan drawn as PNG bytes (size ``figure_inches(plan)`` x ``DPI``)."""
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import LinearSegmentedColormap, Normalize
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    fig = Figure(figsize=figure_inches(plan), dpi=DPI, layout="constrained")
    axes = fig.subplots(len(plan.workload.contexts), 1, squeeze=False)[:, 0]
    for ax, context in zip(axes, plan.workload.contexts, strict=True):
        _draw_panel(ax, plan, context)
    fig.suptitle(title(plan), fontsize=9)
    handles = [Patch(color=COLOURS[a], label=LABELS[a]) for a in (COMPUTE, REUSE, FORECAST)]
    fig.legend(handles=handles, loc="outside lower center", ncol=3, fontsize=8, frameon=False)
    shades = LinearSegmentedColormap.from_list(
        "density", [_shade(COLOURS[COMPUTE], 0.0), COLOURS[COMPUTE]])
    bar = fig.colorbar(ScalarMappable(Normalize(0.0, 1.0), shades), ax=list(axes), shrink=0.8)
    bar.set_label("attention density of compute cells", fontsize=8)
    bar.ax.tick_params(labelsize=7)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI)
    return buffer.getvalue()


def write_plan_png(plan: Plan, path: str | os.PathLike) -> Path:
    """Draw ``plan`` into the PNG ``path`` atomically, creating its folder; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write_bytes(path, render_png(plan))
