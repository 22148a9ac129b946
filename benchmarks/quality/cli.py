"""``python -m benchmarks.quality``: arguments, the quality or scale run, then plot and table."""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
from pathlib import Path

from benchmarks.quality.workload import LONG_MISSING, SUITES, long_model_dir
from ditplan.profiler.commands import tile_type

PLOT_FILE = "pareto.png"
TABLE_FILE = "table.md"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.quality",
                                description="Quality vs speed of ditplan and the alternatives.")
    p.add_argument("--out", type=Path, required=True, help="results folder (resumable)")
    p.add_argument("--quick", action="store_true",
                   help="2 captions, 1 seed, 8 x 32 x 32 px, 4 steps, a few settings (CPU)")
    p.add_argument("--device", help="default: cuda when available, else cpu")
    p.add_argument("--workload", choices=sorted(SUITES), default="reference",
                   help="reference: the reference model at 16 x 48 x 48 px, the full catalog; "
                        "long: the long-sequence model at 32 x 64 x 64 px (32,768 tokens), issue "
                        "15's report set (sparse attention alone at densities 0.5/0.2/0.1, ditplan "
                        "plans with and without sparse attention, RainFusion2.0) and its goals")
    p.add_argument("--model", help="reference or a local pipeline folder (default: the "
                                    "workload's model; long: artifacts/models/"
                                    "ditplan-ref-t2v-long)")
    p.add_argument("--scale", choices=["wan1.3b"],
                   help="after the quality run, also time every method on the Wan2.1-1.3B-shaped "
                        "model (the whole benchmark in one command)")
    p.add_argument("--scale-only", action="store_true",
                   help="with --scale: only the timing at scale, no quality run")
    p.add_argument("--scale-steps", type=int, default=8, help="denoising steps at scale")
    p.add_argument("--captions", type=int,
                   help="held-out captions (default 32, long workload 8; quick 2)")
    p.add_argument("--seeds", type=int, nargs="+", help="noise seeds (default 0)")
    for name in ("steps", "frames", "height", "width", "block-size"):
        p.add_argument(f"--{name}", type=int)
    p.add_argument("--guidance", type=float, help="CFG scale (default 4)")
    p.add_argument("--tile", type=tile_type, help="permutation tile, e.g. 1x8x8")
    p.add_argument("--backend", default="auto", help="sparse kernel backend (auto, flex, torch)")
    p.add_argument("--methods", nargs="+", default=(), metavar="PATTERN",
                   help="run only the methods whose names match (e.g. 'ditplan/*' "
                        "'diffusers-magcache/*'); dense always runs")
    p.add_argument("--plan-files", nargs="+", type=Path, default=(), metavar="PLAN",
                   help="also run these saved plans as they are (rows plan-file/<file stem>; "
                        "without --methods only they run, beside dense)")
    p.add_argument("--report-only", action="store_true",
                   help="only redraw the plot and table from the rows already in --out")
    p.add_argument("--log-level", default="INFO")
    return p


def _configs(args, command: str):
    import torch

    from benchmarks.quality.harness import QualityConfig
    from benchmarks.quality.scale import ScaleConfig

    suite = SUITES[args.workload]
    workload = suite.workload_from(args.quick, steps=args.steps, frames=args.frames,
                                   height=args.height, width=args.width,
                                   guidance_scale=args.guidance, block_size=args.block_size,
                                   tile=args.tile)
    seeds = tuple(args.seeds or (0,))
    plan_files = tuple(args.plan_files)
    if plan_files:
        from benchmarks.quality.plans import plan_file_methods
        from ditplan.policy.plan import PlanError

        try:
            plan_file_methods(plan_files, args.backend)  # every file readable and valid
        except PlanError as error:
            raise ValueError(str(error)) from error
    methods = tuple(args.methods) or (("plan-file/*",) if plan_files else ())
    if len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise ValueError(f"--seeds must be distinct non-negative ints, got {list(seeds)}")
    quality = QualityConfig(
        out=args.out, workload=workload, model=_model(args),
        device=args.device or ("cuda" if torch.cuda.is_available() else "cpu"),
        captions=(2 if args.quick else suite.captions) if args.captions is None else args.captions,
        seeds=seeds, quick=args.quick, backend=args.backend, methods=methods,
        plan_files=plan_files, command=command, suite=suite)
    if not 1 <= quality.captions <= 64:
        raise ValueError(f"--captions must be in 1..64 (the held-out set), got {quality.captions}")
    if args.scale and suite.name != "reference":
        raise ValueError(f"--scale times the reference workload's methods; the {suite.name} "
                         "workload is measured at its own size (drop --scale)")
    if args.scale_only and not args.scale:
        raise ValueError("--scale-only needs --scale wan1.3b")
    if args.scale_steps < 1:
        raise ValueError(f"--scale-steps must be >= 1, got {args.scale_steps}")
    return quality, ScaleConfig(quality, args.scale, args.scale_steps) if args.scale else None


def _model(args) -> str:
    """--model, else the workload's model; the long model must have been trained and exported
    (checked unless only the report is redrawn)."""
    if args.model is not None or args.workload == "reference":
        return args.model or "reference"
    path = long_model_dir()
    if not args.report_only and not (path / "model_index.json").is_file():
        raise ValueError(LONG_MISSING.format(path=path))
    return str(path)


def report(out: Path) -> str:
    """Plot and table from every row in ``out`` (either run may be missing); returns the table."""
    from benchmarks.quality.pareto import plot
    from benchmarks.quality.results import QUALITY_FILE, SCALE_FILE
    from benchmarks.quality.table import markdown
    from ditplan.runtime.outputs import atomic_write

    quality, scale = _latest_run(out / QUALITY_FILE), _latest_run(out / SCALE_FILE)
    text = markdown(quality, scale)
    atomic_write(out / TABLE_FILE, lambda p: p.write_text(text))
    try:
        plot(quality, scale, out / PLOT_FILE)
    except ImportError as error:  # the rows and table are kept; redraw with --report-only
        logging.getLogger(__name__).warning(
            "no plot (%s): install matplotlib and rerun with --report-only", error)
    return text


def _latest_run(path: Path) -> list[dict]:
    """The rows of the run that wrote last to ``path`` (a folder may hold older runs)."""
    from benchmarks.quality.results import read_rows

    rows = read_rows(path)
    return [r for r in rows if r["run_key"] == rows[-1]["run_key"]] if rows else []


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    command = " ".join(["python -m benchmarks.quality", *map(shlex.quote, argv)])
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(message)s")
    try:
        quality, scale = _configs(args, command)
    except ValueError as error:
        parser.error(str(error))
    if not args.report_only:
        from benchmarks.quality.catalog import UnknownMethodError

        try:
            _run(quality, scale, args.scale_only)
        except UnknownMethodError as error:  # raised before anything is measured or written
            parser.error(str(error))
    try:
        print(report(args.out))
    except ValueError as error:  # no rows yet
        parser.error(str(error))
    return 0


def _run(quality, scale, scale_only: bool) -> None:
    if not scale_only:
        from benchmarks.quality.harness import run_quality

        run_quality(quality)
    if scale is not None:
        from benchmarks.quality.scale import run_scale

        run_scale(scale)
