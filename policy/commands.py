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
    compile_.add_argument("trace_dir", type=Path, help="directory written by `ditplan profile`")
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
    compile_.set_defaults(handler=run_compile_policy)

    plan = subparsers.add_parser("plan", help="inspect plan files")
    plan_sub = plan.add_subparsers(dest="plan_command", required=True)
    show = plan_sub.add_parser("show", help="print a plan as a table (and draw it with --png)")
    show.add_argument("plan", type=Path, help="plan file (JSON)")
    show.add_argument("--png", type=Path, default=None, metavar="FILE",
                      help="also draw it: blocks x steps per CFG branch, coloured by compute/"
                      "reuse/forecast and shaded by attention density")
    show.set_defaults(handler=run_plan_show)


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
                fixed_density=fixed, caching=not args.no_cache,
                target_speedup=args.target_speedup)


def run_compile_policy(args: argparse.Namespace) -> int:
    """Handler of ``compile-policy``: traces -> plan file. Returns the exit code."""
    from ditplan.policy.compiler import compile_policy
    from ditplan.policy.config import CompilerConfig, CompilerError
    from ditplan.policy.plan import PlanError
    from ditplan.policy.plan_io import save_plan
    from ditplan.profiler.schema import TraceError

    try:
        overrides = _parse_overrides(args)
    except ValueError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 2
    try:
        config = CompilerConfig.from_name(args.quality, **overrides)
        plan = compile_policy(args.trace_dir, config)
        save_plan(plan, args.out)
    except (TraceError, CompilerError, PlanError) as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 1
    prov = plan.provenance
    sys.stdout.write(f"wrote {args.out}: predicted speedup {prov.predicted_speedup:.2f}x, "
                     f"predicted error {prov.predicted_error:.4f}\n")
    return 0


def run_plan_show(args: argparse.Namespace) -> int:
    """Handler of ``plan show``: print the plan's table, draw it to ``--png``; the exit code."""
    from ditplan.policy.plan import PlanError
    from ditplan.policy.plan_io import load_plan
    from ditplan.policy.show import format_plan

    try:
        plan = load_plan(args.plan)
    except PlanError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 1
    sys.stdout.write(format_plan(plan))
    return _write_png(plan, args.png) if args.png else 0


def _write_png(plan, path: Path) -> int:
    from ditplan.policy.show_png import write_plan_png

    try:
        write_plan_png(plan, path)
    except OSError as exc:
        sys.stderr.write(f"error: cannot write --png {path}: {exc.strerror or exc}\n")
        return 1
    sys.stdout.write(f"wrote {path}\n")
    return 0
