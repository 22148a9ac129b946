"""CLI glue for `ditplan compile-policy` and `ditplan plan show` (registered by runtime/cli.py).

Each handler takes the parsed argparse Namespace and returns an exit code: 0 on success, 1 when
the input is rejected (the message goes to stderr), 2 for malformed flag values.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ditplan.policy.config import QUALITY_PRESETS
from ditplan.policy.plan import ROLES


def register(subparsers) -> None:
    """Add the ``compile-policy`` and ``plan`` subcommands to an argparse subparsers object.

    Each parser sets ``handler`` (call ``args.handler(args)`` to run it).
    """
    compile_ = subparsers.add_parser(
        "compile-policy", help="compile profiler traces into a plan (JSON)",
        description="Compile the traces written by `ditplan profile` into a per-model plan.",
    )
    compile_.add_argument("trace_dir", type=Path,
                          help="directory written by `ditplan profile` (of a two-expert "
                               "Wan2.2 pipeline: one plan file with a section per expert)")
    compile_.add_argument("--out", type=Path, required=True, help="plan file to write (JSON)")
    compile_.add_argument("--quality", choices=sorted(QUALITY_PRESETS), default="balanced")
    compile_.add_argument("--target-speedup", type=float, default=None, metavar="X",
                          help="search settings for the least predicted error reaching X")
    compile_.add_argument("--role", action="append", default=[], metavar="BLOCK=ROLE",
                          help=f"force a block's role ({'/'.join(ROLES)}); repeatable")
    compile_.add_argument("--all-roles", choices=ROLES, default=None,
                          help="force every block's role (before --role overrides)")
    compile_.add_argument("--density", action="append", default=[], metavar="[BLOCK=]D",
                          help="force attention density D for one block, or for all blocks")
    compile_.add_argument("--no-cache", action="store_true", help="no layer caching")
    compile_.add_argument("--mixed-heads", action="store_true",
                          help="heads whose recall never reaches the target stay dense while "
                               "the layer's other heads run sparse (else such a layer is dense "
                               "or one density serves all its heads)")
    compile_.add_argument("--estimate-dropped", nargs="?", const="all",
                          choices=("all", "measured"), default=None,
                          help="sparse heads let each dropped key block enter the softmax as its "
                               "mean key and value: 'all' (the default) every sparse head, "
                               "'measured' those whose profiled output error it lowers (needs "
                               "traces profiled with `ditplan profile --output-error`); "
                               "densities are chosen as without it. Unset, --target-speedup "
                               "searches plans without it and, where the traces record output "
                               "errors, with 'measured'")
    compile_.add_argument("--no-model-runs", action="store_true",
                          help="never skip whole transformer calls (needed for plans run under "
                               "context parallelism, `ditplan run --nproc N`)")
    compile_.add_argument("--min-psnr", type=float, default=None, metavar="DB",
                          help="with --calibrate: the fastest plan measuring at least DB dB")
    calibration = compile_.add_argument_group(
        "calibration", "run the best candidates on this device against dense output (same "
        "seeds) and choose by what they measure; the plan records it")
    calibration.add_argument(
        "--calibrate", action="store_true",
        help="measure the shortlisted candidates (needs --target-speedup and/or --min-psnr). "
             "A two-expert (Wan2.2) profile: each expert's shortlist comes from its own traces, "
             "the i-th candidates of the two run together and each pair is measured end to end "
             "(no second round closer to the target, no --refine); both sections record the "
             "pair's measurement")
    calibration.add_argument("--model", default=None,
                             help="pipeline to calibrate on (default: the one profiled)")
    calibration.add_argument("--device", default=None,
                             help="torch device (default: cuda when available, else cpu)")
    calibration.add_argument("--calibration-prompts", nargs="+", default=None, metavar="P",
                             help="prompts, or a .txt file with one per line (default: the "
                                  "profiling prompts; never use your evaluation prompts)")
    calibration.add_argument("--calibration-seeds", type=int, nargs="+", default=[0])
    calibration.add_argument("--calibration-repeats", type=positive_int, default=1,
                             metavar="N",
                             help="timed generations per candidate, median kept (a noisy "
                                  "host: 3)")
    calibration.add_argument("--calibration-batch", type=positive_int, default=None,
                             metavar="N",
                             help="generate the calibration prompts x seeds N at a time; set "
                                  "it to the batch you generate with (`ditplan run`: 1), since "
                                  "speed depends on it (default: all in one batch)")
    calibration.add_argument("--refine", type=int, default=0, metavar="ROUNDS",
                             help="then move single compute steps of the best plan, 4 measured "
                                  "neighbours a round, keeping what measures better (default 0; "
                                  "not for two-expert profiles)")
    calibration.add_argument("--candidates", type=int, default=12,
                             help="candidate plans to measure (default 12), then with a "
                                  "target up to half as many closer to it (two experts: this "
                                  "many pairs, no second round)")
    calibration.add_argument("--calibration-record", type=Path, default=None,
                             help="JSONL of finished measurements, to resume (default: next "
                                  "to --out)")
    calibration.add_argument("--backend", default="auto",
                             choices=["auto", "fa4", "flex", "torch", "dense"])
    compile_.set_defaults(handler=run_compile_policy)

    plan = subparsers.add_parser("plan", help="inspect plan files")
    plan_sub = plan.add_subparsers(dest="plan_command", required=True)
    show = plan_sub.add_parser("show", help="print a plan as a table (and draw it with --png)")
    show.add_argument("plan", type=Path, help="plan file (JSON)")
    show.add_argument("--png", type=Path, default=None, metavar="FILE",
                      help="also draw it: blocks x steps per CFG branch, coloured by compute/"
                      "reuse/forecast and shaded by attention density (an expert plan: one "
                      "FILE-<expert>.png per section)")
    show.set_defaults(handler=run_plan_show)


def positive_int(text: str) -> int:
    """An argparse type: a whole number, at least 1 (``--calibration-batch``, ``run --steps``
    ...); a bad one is an argparse error (exit code 2) before any work."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _parse_overrides(args: argparse.Namespace) -> dict:
    roles, densities, fixed = {}, {}, None
    for item in args.role:
        block, sep, role = item.partition("=")
        if not sep or not block:
            raise ValueError(f"--role {item!r}: expected BLOCK=ROLE, e.g. blocks.3=background")
        roles[block] = role
    for item in args.density:
        block, sep, value = item.rpartition("=")
        try:
            density = float(value)
        except ValueError:
            raise ValueError(f"--density {item!r}: expected [BLOCK=]D, e.g. 0.2") from None
        if sep:
            densities[block] = density
        else:
            fixed = density
    return dict(roles=roles, all_roles=args.all_roles, densities=densities,
                fixed_density=fixed, caching=not args.no_cache, model_runs=not args.no_model_runs,
                mixed_heads=args.mixed_heads, estimate_dropped=args.estimate_dropped,
                target_speedup=args.target_speedup, min_psnr=args.min_psnr,
                calibrate_candidates=args.candidates, refine_rounds=args.refine)


def _calibrator(args: argparse.Namespace):
    """The Calibrator for ``--calibrate`` (imports torch), else None."""
    if not args.calibrate:
        return None
    if args.target_speedup is None and args.min_psnr is None:
        raise ValueError("--calibrate needs --target-speedup X and/or --min-psnr DB")
    from ditplan.profiler.commands import read_prompts
    from ditplan.profiler.manifest import profiled_arguments
    from ditplan.runtime.calibrate import CalibrationSetup, Calibrator

    profiled = profiled_arguments(args.trace_dir)
    prompts = (read_prompts(args.calibration_prompts) if args.calibration_prompts
               else tuple(profiled.get("prompts") or ()))
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    setup = CalibrationSetup(
        model=args.model or profiled.get("model") or "reference", prompts=prompts,
        device=device, seeds=tuple(args.calibration_seeds), backend=args.backend,
        record=args.calibration_record or args.out.with_suffix(".calibration.jsonl"),
        warmup=1 if torch.device(device).type == "cuda" else 0,
        repeats=args.calibration_repeats, batch=args.calibration_batch)
    return Calibrator(setup)


def run_compile_policy(args: argparse.Namespace) -> int:
    """Handler of ``compile-policy``: traces -> plan file. Returns the exit code."""
    from ditplan.policy.compiler import compile_policy
    from ditplan.policy.config import CompilerConfig, CompilerError
    from ditplan.policy.expert_compiler import (
        check_expert_config,
        compile_experts,
        is_expert_profile,
    )
    from ditplan.policy.experts import save_any_plan
    from ditplan.policy.plan import PlanError
    from ditplan.profiler.schema import TraceError

    try:
        overrides = _parse_overrides(args)
    except ValueError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 2
    try:
        config = CompilerConfig.from_name(args.quality, **overrides)
        if is_expert_profile(args.trace_dir):
            check_expert_config(config)  # before the calibrator loads the pipeline
            plans = compile_experts(args.trace_dir, config, calibrate=_calibrator(args))
        else:
            plans = compile_policy(args.trace_dir, config, calibrate=_calibrator(args))
        save_any_plan(plans, args.out)
    except (TraceError, CompilerError, PlanError, ValueError) as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 1
    sys.stdout.write(f"wrote {args.out}: {_summary(plans)}\n")
    return 0


def _summary(plans) -> str:
    """What the command prints about the written plan (each expert's, for expert plans)."""
    from ditplan.policy.plan import Plan

    if not isinstance(plans, Plan):
        said = "; ".join(f"{name} steps {list(plan.workload.step_range)}: "
                         f"{_predicted(plan)}" for name, plan in plans.experts.items())
        calibration = next(iter(plans.experts.values())).provenance.calibration
        return said + (f"; the pair {_measured(calibration)}" if calibration else "")
    calibration = plans.provenance.calibration
    return _predicted(plans) + (f"; {_measured(calibration)}" if calibration else "")


def _predicted(plan) -> str:
    prov = plan.provenance
    return (f"predicted speedup {prov.predicted_speedup:.2f}x, "
            f"predicted error {prov.predicted_error:.4f}")


def _measured(c) -> str:
    return (f"measured {c.speedup:.2f}x at {c.psnr_db:.2f} dB on {c.device} "
            f"(best of {c.candidates} candidates)")


def run_plan_show(args: argparse.Namespace) -> int:
    """Handler of ``plan show``: print the plan's table (each expert's section, for expert
    plans), draw it to ``--png``; the exit code."""
    from ditplan.policy.experts import load_any_plan
    from ditplan.policy.plan import Plan, PlanError
    from ditplan.policy.show import format_experts, format_plan

    try:
        plans = load_any_plan(args.plan)
    except PlanError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 1
    if isinstance(plans, Plan):
        sys.stdout.write(format_plan(plans))
        return _write_png(plans, args.png) if args.png else 0
    sys.stdout.write(format_experts(plans))
    if not args.png:
        return 0
    for name, plan in plans.experts.items():
        code = _write_png(plan, args.png.with_name(f"{args.png.stem}-{name}{args.png.suffix}"))
        if code:
            return code
    return 0


def _write_png(plan, path: Path) -> int:
    from ditplan.policy.show_png import write_plan_png

    try:
        write_plan_png(plan, path)
    except OSError as exc:
        sys.stderr.write(f"error: cannot write --png {path}: {exc.strerror or exc}\n")
        return 1
    sys.stdout.write(f"wrote {path}\n")
    return 0
