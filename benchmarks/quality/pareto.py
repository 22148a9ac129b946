"""Pareto plot (speedup vs PSNR to dense, one curve per method family) and where ditplan's curve
is or is not above the others'."""

from __future__ import annotations

from pathlib import Path

from ditplan.runtime.outputs import atomic_write

OURS = "ditplan"
CLAIM_SPEEDUP = 1.5  # issue 7: ditplan must lead at speedups of 1.5x and more


def points(quality_rows: list[dict], speedups: dict[str, float] | None = None) -> dict:
    """Finished, scored rows as {family: [(speedup, psnr, setting)]}, sorted by speedup.

    ``speedups`` (method -> speedup) replaces the x value, e.g. with the speed at scale.
    """
    out: dict[str, list] = {}
    for row in quality_rows:
        if row.get("status") != "ok" or row.get("psnr_db_mean") is None:
            continue
        x = row["speedup"] if speedups is None else speedups.get(row["method"])
        if x is not None:
            out.setdefault(row["family"], []).append((x, row["psnr_db_mean"], row["setting"]))
    return {family: sorted(p) for family, p in out.items()}


def not_dominated(curves: dict, min_speedup: float = CLAIM_SPEEDUP) -> list[str]:
    """Other methods' points at >= min_speedup that no ditplan point matches or beats in both
    speedup and PSNR, as readable lines (empty: ditplan leads everywhere it was measured)."""
    ours = curves.get(OURS, [])
    lines = []
    for family, family_points in sorted(curves.items()):
        if family.startswith((OURS, "dense")):  # ditplan's own ablations are not competitors
            continue
        for x, psnr, setting in family_points:
            if x >= min_speedup and not any(ox >= x and op >= psnr for ox, op, _ in ours):
                lines.append(f"{family}/{setting}: {x:.2f}x at {psnr:.2f} dB is not matched by "
                             "any ditplan plan")
    return lines


def plot(quality_rows: list[dict], scale_rows: list[dict], path: Path) -> Path:
    """Write the PNG: reference-model speedup vs PSNR, plus speed at scale when measured.

    Args:
        quality_rows, scale_rows: rows of one quality run and one scale run (either may be []).
        path: the PNG to write (atomically).

    Returns:
        ``path``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("speedup on the reference model (same run)", points(quality_rows))]
    scale = {r["method"]: r["speedup"] for r in scale_rows if r.get("status") == "ok"}
    if scale:
        panels.append(("speedup at scale (Wan2.1-1.3B shape, 480p x 81)",
                       points(quality_rows, scale)))
    fig, axes = plt.subplots(1, len(panels), figsize=(7 * len(panels), 5), squeeze=False)
    families = sorted({family for _, curves in panels for family in curves})
    palette = plt.get_cmap("tab20").colors
    colours = {f: "black" if f == OURS else palette[i % len(palette)]
               for i, f in enumerate(families)}  # one colour per family in every panel
    for ax, (xlabel, curves) in zip(axes[0], panels, strict=True):
        for family, family_points in sorted(curves.items()):
            xs, ys = [p[0] for p in family_points], [p[1] for p in family_points]
            ax.plot(xs, ys, marker="o", color=colours[family], label=family,
                    linewidth=2.5 if family == OURS else 1.2,
                    linestyle="--" if family.startswith(f"{OURS}-") else "-")
        ax.axvline(1.0, color="grey", linestyle=":", linewidth=1)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("PSNR to dense, same seed (dB)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=120))
    plt.close(fig)
    return path
