"""The markdown table of a run (card, date, versions, command, then one line per method x
setting, then the comparisons; for the long workload, issue 15's goals), for BENCHMARKS.md."""

from __future__ import annotations

import re

from benchmarks.quality.goals import goal_lines
from benchmarks.quality.pareto import (
    CLAIM_MARGIN_DB,
    CLAIM_SPEEDUP,
    matched,
    not_dominated,
    points,
)

COLUMNS = ("method", "speedup", "predicted", "at scale", "PSNR dB", "SSIM", "cosine",
           "caption acc.", "attn. density", "blocks skipped", "status")


def _num(value, digits: int = 2, suffix: str = "") -> str:
    return "" if value is None else f"{value:.{digits}f}{suffix}"


def _line(row: dict, scale: dict) -> str:
    stats = row.get("stats") or {}
    status = row["status"] if row["status"] == "ok" else f"{row['status']}: {row.get('reason')}"
    if row.get("same_plan_as"):
        status = f"ok: the plan of {row['same_plan_as']} (its measurements, not run again)"
    psnr = _num(row.get("psnr_db_mean"))
    if row.get("identical_clips"):
        psnr = f"{psnr} ({row['identical_clips']} identical)".strip()
    cells = (row["method"], _num(row.get("speedup"), suffix="x"),
             _num(stats.get("predicted_speedup"), suffix="x"), _at_scale(scale, row), psnr,
             _num(row.get("ssim_mean"), 3), _num(row.get("cosine_mean"), 4),
             _num(row.get("caption_accuracy")), _num(stats.get("attention_density")),
             _num(stats.get("blocks_skipped_share")), status)
    return "| " + " | ".join(cells) + " |"


def _at_scale(scale: dict, row: dict) -> str:
    found = scale.get(row["method"])
    if found is None:
        return ""
    return _num(found.get("speedup"), suffix="x") if found["status"] == "ok" else found["status"]


def _distinct(rows: list[dict], key: str) -> list[str]:
    return list(dict.fromkeys(str(r[key]) for r in rows))  # first-appearance order


def _cards(rows: list[dict]) -> str:
    cards = _distinct(rows, "card")
    if len(cards) == 1:
        return cards[0]
    return (f"{' and '.join(cards)} (rows resumed on another card; each row's speedup is against "
            "the dense time its own process measured on its own card)")


def _commands(rows: list[dict]) -> str:
    return ", ".join(f"`{c}`" for c in _distinct(rows, "command"))


def _header(rows: list[dict], scale_rows: list[dict]) -> list[str]:
    first = rows[0]
    lines = [f"Card: {_cards(rows)}; torch {first['torch']}, diffusers {first['diffusers']}; "
             f"date {first['date']}.",
             f"Commands (one run, resumed): {_commands(rows)}",
             f"Workload: {first['workload']}; {first['samples']} held-out caption x seed "
             "samples, generated in one batch; speedup = dense batch time / method batch time "
             "(medians over each row's timed_calls batches, after a warm-up), same run."]
    if scale_rows:
        s = scale_rows[0]
        lines.append(f"At scale: {_commands(scale_rows)} ({s['scale']}, latents "
                     f"{s['latents_shape']}, {s['steps']} steps with CFG, random weights, "
                     f"{_cards(scale_rows)}).")
    return lines


def catalog_order(rows: list[dict]) -> list[dict]:
    """dense/baseline first, then families in first-appearance order, settings sorted
    naturally within a family (a resumed run appends rows out of order)."""
    families = _distinct(rows, "family")
    number = re.compile(r"(\d+(?:\.\d+)?)")

    def key(indexed):
        index, row = indexed
        numbers = [float(x) for x in number.findall(row["setting"])]
        return (row["method"] != "dense/baseline", families.index(row["family"]), numbers, index)

    return [row for _, row in sorted(enumerate(rows), key=key)]


def markdown(quality_rows: list[dict], scale_rows: list[dict]) -> str:
    """The table; scale-only rows are listed too when no quality row has their method."""
    rows = quality_rows or scale_rows
    if not rows:
        raise ValueError("no result rows to tabulate; run the benchmark first")
    scale = {r["method"]: r for r in scale_rows}
    lines = [*(_header(quality_rows, scale_rows) if quality_rows else []), ""]
    lines += ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += [_line(r, scale) for r in catalog_order(quality_rows)]
    known = {r["method"] for r in quality_rows}
    lines += [_line({**r, "speedup": None}, scale) for r in catalog_order(scale_rows)
              if r["method"] not in known]
    unscaled = [r for r in scale_rows if r["status"] != "ok"]
    if unscaled:
        lines += ["", "Not timed at scale:"]
        lines += [f"- {r['method']}: {r['status']}: {r.get('reason')}" for r in unscaled]
    misses = not_dominated(points(quality_rows))
    lines += ["", f"Where ditplan's curve is not {CLAIM_MARGIN_DB:g} dB above another method at "
                  f">= {CLAIM_SPEEDUP}x (reference-model speedup, same speedup):"]
    lines += [f"- {m}" for m in misses] or ["- nowhere among the measured points"]
    lines += ["", "PSNR at matched speedups (linear between each family's points; below its "
                  "slowest point, that point's PSNR):"]
    lines += [f"- {m}" for m in matched(points(quality_rows))]
    if quality_rows and quality_rows[0].get("suite") == "long":
        lines += ["", "Issue 15's goals (equal PSNR: the caching-only plans' points joined "
                      "linearly; sparse + caching plans ran sparse attention and skipped blocks):"]
        lines += goal_lines(quality_rows)
    return "\n".join(lines) + "\n"
