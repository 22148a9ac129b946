"""Pareto plot (speedup vs PSNR to dense, one curve per method family) and where ditplan's curve
is or is not above the others'."""

from __future__ import annotations

from pathlib import Path

from ditplan.runtime.outputs import atomic_write

OURS = "ditplan"
CLAIM_SPEEDUP = 1.5  # issue 13: ditplan must lead at speedups of 1.5x and more
CLAIM_MARGIN_DB = 1.0  # ... by at least this much PSNR at a matched speedup


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


def psnr_at(family_points: list, speedup: float) -> float | None:
    """A family's PSNR at ``speedup``: linear between its measured points, the slowest point's
    PSNR below them (it is faster and as good), None beyond its fastest point."""
    if not family_points or speedup > family_points[-1][0]:
        return None
    best = None
    for (x0, p0, _), (x1, p1, _) in zip(family_points, family_points[1:], strict=False):
        if x0 <= speedup <= x1:
            value = p0 + (p1 - p0) * (speedup - x0) / (x1 - x0) if x1 > x0 else max(p0, p1)
            best = value if best is None else max(best, value)
    if speedup <= family_points[0][0]:
        best = max(p for _, p, _ in family_points)
    return best


def is_ours(family: str) -> bool:
    """ditplan's families (presets, calibrated plans, ablations), not dense or a peer."""
    return family.split("-")[0] == OURS


def ours_at(curves: dict, speedup: float) -> float | None:
    """The best ditplan family's PSNR at ``speedup`` (psnr_at), None if none is that fast."""
    values = [psnr_at(p, speedup) for f, p in curves.items() if is_ours(f)]
    return max((v for v in values if v is not None), default=None)


def not_dominated(curves: dict, min_speedup: float = CLAIM_SPEEDUP,
                  margin_db: float = CLAIM_MARGIN_DB) -> list[str]:
    """Other methods' points at >= min_speedup where no ditplan family's curve (interpolated
    between its measured points) is ``margin_db`` above them, as readable lines (empty: ditplan
    leads everywhere it was measured)."""
    lines = []
    for family, family_points in sorted(curves.items()):
        if is_ours(family) or family.startswith("dense"):
            continue
        for x, psnr, setting in family_points:
            if x < min_speedup:
                continue
            at = ours_at(curves, x)
            if at is None:
                lines.append(f"{family}/{setting}: {x:.2f}x at {psnr:.2f} dB: no ditplan plan "
                             "is that fast")
            elif at < psnr + margin_db:
                lines.append(f"{family}/{setting}: {x:.2f}x at {psnr:.2f} dB: ditplan's best "
                             f"curve there is {at:.2f} dB ({at - psnr:+.2f})")
    return lines


MATCHED_SPEEDUPS = (1.5, 2.0, 3.0)  # issue 13's comparison points


def matched(curves: dict, speedups=MATCHED_SPEEDUPS) -> list[str]:
    """At each speedup, ditplan's best curve against every other family's (psnr_at), as lines."""
    lines = []
    for x in speedups:
        best = ours_at(curves, x)
        if best is None:
            lines.append(f"{x:g}x: no ditplan plan measured this fast")
            continue
        others = {f: v for f, v in ((f, psnr_at(p, x)) for f, p in curves.items()
                                    if not is_ours(f) and not f.startswith("dense"))
                  if v is not None}
        text = ", ".join(f"{f} {v:.2f} ({best - v:+.2f})" for f, v in
                         sorted(others.items(), key=lambda kv: -kv[1]))
        lines.append(f"{x:g}x: ditplan {best:.2f} dB; {text or 'no other method this fast'}")
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
