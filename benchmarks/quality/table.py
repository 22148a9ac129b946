"""The markdown table of a run (card, date, versions, command, then one line per method x
setting), for pasting into BENCHMARKS.md."""

from __future__ import annotations

from benchmarks.quality.pareto import CLAIM_SPEEDUP, not_dominated, points

COLUMNS = ("method", "speedup", "at scale", "PSNR dB", "SSIM", "cosine", "caption acc.",
           "attn. density", "blocks skipped", "status")


def _num(value, digits: int = 2, suffix: str = "") -> str:
    return "" if value is None else f"{value:.{digits}f}{suffix}"


def _line(row: dict, scale: dict) -> str:
    stats = row.get("stats") or {}
    status = row["status"] if row["status"] == "ok" else f"{row['status']}: {row.get('reason')}"
    psnr = _num(row.get("psnr_db_mean"))
    if row.get("identical_clips"):
        psnr = f"{psnr} ({row['identical_clips']} identical)".strip()
    cells = (row["method"], _num(row.get("speedup"), suffix="x"), _at_scale(scale, row), psnr,
             _num(row.get("ssim_mean"), 3), _num(row.get("cosine_mean"), 4),
             _num(row.get("caption_accuracy")), _num(stats.get("attention_density")),
             _num(stats.get("blocks_skipped_share")), status)
    return "| " + " | ".join(cells) + " |"


def _at_scale(scale: dict, row: dict) -> str:
    found = scale.get(row["method"])
    if found is None:
        return ""
    return _num(found.get("speedup"), suffix="x") if found["status"] == "ok" else found["status"]


def _header(rows: list[dict], scale_rows: list[dict]) -> list[str]:
    first = rows[0]
    cards = sorted({r["card"] for r in rows})
    card = first["card"] if len(cards) == 1 else (
        f"{' and '.join(cards)} (rows resumed on another card; each row's speedup is against "
        "the dense time its own process measured on its own card)")
    lines = [f"Card: {card}; torch {first['torch']}, diffusers {first['diffusers']}; "
             f"date {first['date']}.",
             f"Command: `{first['command']}`",
             f"Workload: {first['workload']}; {first['samples']} held-out caption x seed "
             "samples, generated in one batch; speedup = dense batch time / method batch time "
             "(medians over each row's timed_calls batches, after a warm-up), same run."]
    if scale_rows:
        s = scale_rows[0]
        lines.append(f"At scale: `{s['command']}` ({s['scale']}, latents {s['latents_shape']}, "
                     f"{s['steps']} steps with CFG, random weights, {s['card']}).")
    return lines


def markdown(quality_rows: list[dict], scale_rows: list[dict]) -> str:
    """The table; scale-only rows are listed too when no quality row has their method."""
    rows = quality_rows or scale_rows
    if not rows:
        raise ValueError("no result rows to tabulate; run the benchmark first")
    scale = {r["method"]: r for r in scale_rows}
    lines = [*(_header(quality_rows, scale_rows) if quality_rows else []), ""]
    lines += ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += [_line(r, scale) for r in quality_rows]
    known = {r["method"] for r in quality_rows}
    lines += [_line({**r, "speedup": None}, scale) for r in scale_rows if r["method"] not in known]
    unscaled = [r for r in scale_rows if r["status"] != "ok"]
    if unscaled:
        lines += ["", "Not timed at scale:"]
        lines += [f"- {r['method']}: {r['status']}: {r.get('reason')}" for r in unscaled]
    misses = not_dominated(points(quality_rows))
    lines += ["", f"Where ditplan's curve is not above another method at >= {CLAIM_SPEEDUP}x "
                  "(reference-model speedup):"]
    lines += [f"- {m}" for m in misses] or ["- nowhere among the measured points"]
    return "\n".join(lines) + "\n"
