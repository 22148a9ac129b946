"""Issue 15's goals for the long workload, judged from a run's rows: met, missed or not measured."""

from __future__ import annotations

import math
from dataclasses import dataclass

from benchmarks.quality.plans import PLAN_FILE_FAMILY
from benchmarks.quality.sparse_layers import EVERY_LAYER_FAMILY
from benchmarks.quality.sparse_layers import FAMILY as SPARSE_ONLY

GOAL_DENSITY = 0.2  # 80% sparsity
MIN_COSINE = 0.98
MIN_PSNR_DB = 30.0
MIN_CACHING_GAIN = 1.3  # sparse + caching vs the best caching-only plan, at equal PSNR
CACHING_ONLY = "ditplan-cache-only"
CACHE_ONLY_CALIBRATED = "ditplan-cache-only-calibrated"
# the curve that sparse + caching must beat
CACHING_ONLY_FAMILIES = (CACHING_ONLY, CACHE_ONLY_CALIBRATED)


@dataclass(frozen=True)
class Verdict:
    """One goal: met (True), missed (False) or not measured (None), with the numbers."""

    goal: str
    met: bool | None
    detail: str

    def line(self) -> str:
        state = "not measured" if self.met is None else "met" if self.met else "missed"
        return f"- {self.goal}: **{state}**: {self.detail}"


def sparse_quality(rows: list[dict]) -> Verdict:
    """Sparse attention alone at GOAL_DENSITY in the compiler's layers: cosine and PSNR."""
    goal = (f"density {GOAL_DENSITY:g} in the layers the compiler chooses: cosine to dense >= "
            f"{MIN_COSINE:g} and PSNR >= {MIN_PSNR_DB:g} dB")
    row = _goal_density_row(rows, SPARSE_ONLY)
    every = _goal_density_row(rows, EVERY_LAYER_FAMILY)
    aside = (f"; for comparison, every layer sparse: {_quality(every)}"
             if every is not None and every["status"] == "ok" else "")
    if row is None:
        return Verdict(goal, None, f"no {SPARSE_ONLY}/d={GOAL_DENSITY:g} row{aside}")
    if row["status"] != "ok":
        return Verdict(goal, None,
                       f"{row['method']}: {row['status']}: {row.get('reason')}{aside}")
    layers = (row.get("stats") or {}).get("sparse_layers", [])
    detail = f"{_quality(row)} (sparse layers: {', '.join(layers) or 'none recorded'})"
    return Verdict(goal, row["cosine_mean"] >= MIN_COSINE and _psnr(row) >= MIN_PSNR_DB, detail)


def _goal_density_row(rows: list[dict], family: str) -> dict | None:
    return next((r for r in rows if r["family"] == family
                 and (r.get("params") or {}).get("density") == GOAL_DENSITY), None)


def _quality(row: dict) -> str:
    return (f"{row['method']}: cosine {row['cosine_mean']:.4f}, PSNR {_psnr(row):.2f} dB, "
            f"{row['speedup']:.2f}x")


def _psnr(row: dict) -> float:
    """Mean PSNR over the clips that differ; inf when every clip equals dense."""
    return math.inf if row["psnr_db_mean"] is None else row["psnr_db_mean"]


def caching_speedup_at(curve: list[tuple[float, float]], psnr: float) -> float | None:
    """The fastest the caching-only curve runs at PSNR >= ``psnr``: its Pareto front (the
    measured (speedup, PSNR) points no other point matches in both) joined linearly in speedup
    order; None outside the PSNRs it spans."""
    reach = caching_reach(curve, psnr)
    return None if reach is None else reach[0]


def caching_reach(curve: list[tuple[float, float]], psnr: float
                  ) -> tuple[float, tuple[int, ...]] | None:
    """caching_speedup_at, with the indices into ``curve`` of the point, or the two points
    joined, that give it. A dominated point is left out: it is never the best caching-only
    plan, and joined to its neighbours it would lower the curve."""
    if not curve or not min(p for _, p in curve) <= psnr <= max(p for _, p in curve):
        return None
    front = sorted((i for i in range(len(curve)) if not _dominated(curve, i)),
                   key=lambda i: curve[i])
    reaches = [(curve[i][0], (i,)) for i in front if curve[i][1] >= psnr]
    for i, j in zip(front, front[1:], strict=False):
        (x0, p0), (x1, p1) = curve[i], curve[j]
        if min(p0, p1) <= psnr <= max(p0, p1) and p0 != p1:
            reaches.append((x0 + (x1 - x0) * (p0 - psnr) / (p0 - p1), (i, j)))
    return max(reaches, key=lambda r: (r[0], -len(r[1])))  # a measured point wins a tie


def _dominated(curve: list[tuple[float, float]], i: int) -> bool:
    """Some other point is at least as fast and as sharp as point ``i``, and better in one."""
    x, p = curve[i]
    return any(x1 >= x and p1 >= p and (x1, p1) != (x, p) for x1, p1 in curve)


def caching_gain(rows: list[dict]) -> Verdict:
    """The best speed ratio of a compiled plan with sparse attention and caching over the
    caching-only curve (every measured caching-only plan, _caching_only) at the plan's PSNR
    (only plans inside the PSNRs that curve spans are compared)."""
    goal = (f"sparse attention + caching >= {MIN_CACHING_GAIN:g}x faster than the best "
            "caching-only plan at equal PSNR")
    ok = [r for r in rows if r["status"] == "ok" and r["psnr_db_mean"] is not None]
    caching = [r for r in ok if _caching_only(r)]
    curve = [(r["speedup"], r["psnr_db_mean"]) for r in caching]
    plans = [r for r in ok if _ditplan_plan(r) and _sparse_and_cached(r)]
    if not curve or not plans:
        return Verdict(goal, None, f"{len(curve)} caching-only and {len(plans)} sparse + "
                                   "caching plans measured (need both)")
    compared = [(r, reach) for r in plans
                if (reach := caching_reach(curve, r["psnr_db_mean"])) is not None]
    if not compared:
        span = f"{min(p for _, p in curve):.2f}-{max(p for _, p in curve):.2f} dB"
        return Verdict(goal, None, f"no sparse + caching plan's PSNR lies in the caching-only "
                                   f"curve's {span}")
    row, (base, basis) = max(compared, key=lambda c: c[0]["speedup"] / c[1][0])
    gain = row["speedup"] / base
    points = " and ".join(f"{caching[i]['method']} ({curve[i][0]:.2f}x, {curve[i][1]:.2f} dB)"
                          for i in basis)
    detail = (f"{row['method']}: {row['speedup']:.2f}x at {row['psnr_db_mean']:.2f} dB; caching "
              f"only reaches that PSNR at {base:.2f}x: {gain:.2f}x faster "
              f"({len(compared)} of {len(plans)} sparse + caching plans compared; caching only "
              f"from {points})")
    return Verdict(goal, gain >= MIN_CACHING_GAIN, detail)


def _caching_only(row: dict) -> bool:
    """A caching-only plan: the compiler's (attention forced dense), or a saved plan that runs
    every attention dense and skips some block evaluations (``--plan-files``: a plan made by
    hand or outside the compiler's search is a caching-only plan too)."""
    if row["family"] in CACHING_ONLY_FAMILIES:
        return True
    stats = row.get("stats") or {}
    return (row["family"] == PLAN_FILE_FAMILY and stats.get("attention_density") == 1.0
            and stats.get("blocks_skipped_share", 0.0) > 0.0)


def _ditplan_plan(row: dict) -> bool:
    """A compiled ditplan plan of any family but caching-only (plain, calibrated, mixed heads,
    estimated)."""
    return row["family"].startswith("ditplan") and row["family"] not in CACHING_ONLY_FAMILIES


def _sparse_and_cached(row: dict) -> bool:
    """The plan ran some attention sparse and skipped some block evaluations."""
    stats = row.get("stats") or {}
    return (stats.get("attention_density", 1.0) < 1.0
            and stats.get("blocks_skipped_share", 0.0) > 0.0)


def goal_lines(rows: list[dict]) -> list[str]:
    """Both goals as markdown lines."""
    return [sparse_quality(rows).line(), caching_gain(rows).line()]
