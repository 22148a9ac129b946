"""The ``ditplan`` command: ``profile``, ``compile-policy``, ``plan show`` and ``run``."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value


def _add_run(subparsers) -> None:
    from ditplan.policy.commands import positive_int
    from ditplan.runtime.pipeline_calls import GUIDANCE_HELP

    p = subparsers.add_parser("run", help="generate a video or image with a plan applied")
    p.add_argument(
        "--model",
        default="reference",
        help="'reference' (built-in), a local diffusers folder, or a hub id",
    )
    p.add_argument("--plan", type=Path, help="plan JSON from compile-policy (none: dense)")
    p.add_argument("--prompt", help="text prompt (reference model: its caption vocabulary)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=positive_int)
    p.add_argument("--height", type=positive_int)
    p.add_argument("--width", type=positive_int)
    p.add_argument("--frames", type=positive_int,
                   help="video pipelines; image pipelines (FLUX.1, Qwen-Image) make one frame")
    p.add_argument("--guidance-scale", type=_positive_float, help=GUIDANCE_HELP)
    p.add_argument("--device", help="torch device (default: cuda when available, else cpu)")
    p.add_argument("--backend", default="auto", choices=["auto", "fa4", "flex", "torch", "dense"])
    p.add_argument("--out", type=Path, default=Path("out"), help="output folder")
    p.add_argument(
        "--compare-dense",
        action="store_true",
        help="also run dense with the same seed; report speedup, PSNR, SSIM",
    )
    p.add_argument(
        "--repeats",
        type=positive_int,
        default=1,
        help="generate this many times (each of dense and the plan) and report median times; "
        "on a GPU use 3 or more so warm-up and kernel compilation are left out",
    )
    p.add_argument(
        "--compile",
        nargs="?",
        const="inductor",
        metavar="BACKEND",
        help="compile each transformer block with torch.compile (default backend inductor; "
        "the plan's cache decisions stay outside the graphs); with --compare-dense, dense is "
        "compiled alike. Each side first runs an untimed generation, which compiles",
    )
    p.add_argument(
        "--nproc",
        type=positive_int,
        default=1,
        help="run as N processes (torchrun, one GPU each) with diffusers' context parallelism "
        "(Ulysses, degree N); rank 0 writes the outputs. Under torchrun, leave it out",
    )
    p.set_defaults(handler=_run)


def _run(args) -> int:
    from ditplan.runtime.launch import LaunchError, detect_launch, relaunch, without_option

    launch = detect_launch()
    if args.nproc > 1:
        if launch is not None:
            raise LaunchError(f"--nproc {args.nproc} launches torchrun itself, but this process "
                              f"is already rank {launch.rank} of {launch.world}: drop --nproc "
                              "under torchrun")
        return relaunch(args.nproc, without_option(args.argv, "--nproc"))
    import torch

    from ditplan.runtime.launch import joined
    from ditplan.runtime.run import RunConfig, run_generation

    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    fields = {k: getattr(args, k) for k in RunConfig.__dataclass_fields__}
    fields["compile"] = {"backend": args.compile} if args.compile else False
    try:
        if launch is None:
            metrics = run_generation(RunConfig(**fields))
        else:
            with joined(launch, args.device) as device:
                metrics = run_generation(RunConfig(**{**fields, "device": device}), launch)
            if not launch.writes_outputs:
                return 0
    except torch._dynamo.exc.BackendCompilerFailed as error:  # nothing is written before the end
        raise ValueError(f"torch.compile's {args.compile} backend failed: "
                         f"{error.inner_exception}; run without --compile, or try --compile "
                         "eager") from error
    run = metrics["run"]
    line = (f"wrote {args.out / metrics['output']}: {run['wall_s']:.1f} s, "
            f"{run['step_s_median']:.2f} s/step")
    if args.repeats > 1:
        line += f" (medians of {args.repeats} generations)"
    if "speedup_vs_dense" in metrics:
        quality = metrics["vs_dense"]
        line += (
            f"; {metrics['speedup_vs_dense']:.2f}x vs dense (median step "
            f"{metrics['step_speedup_vs_dense']:.2f}x), PSNR "
            f"{quality['psnr_db']:.1f} dB, SSIM {quality['ssim']:.3f}"
        )
    print(line)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from ditplan.policy import commands as policy_commands
    from ditplan.profiler import commands as profiler_commands

    parser = argparse.ArgumentParser(
        prog="ditplan", description="Profile a diffusion transformer, compile a plan, run it fast."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log decisions")
    subparsers = parser.add_subparsers(dest="command", required=True)
    profiler_commands.register(subparsers)
    policy_commands.register(subparsers)
    _add_run(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    from ditplan.runtime.launch import launched_as_ranks

    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else list(argv)
    ranks = launched_as_ranks()
    if ranks > 1 and args.command != "run":  # every rank would write the same outputs
        print(f"ditplan {args.command}: error: launched as {ranks} processes (torchrun or "
              f"similar), but {args.command} runs in one process (only `ditplan run` runs "
              "under context parallelism; plans made on one GPU serve any number); run it "
              "without torchrun", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    from ditplan.runtime.outputs import VideoWriterError

    try:
        return args.handler(args)
    except (ValueError, FileNotFoundError) as error:  # PlanError/TraceError are ValueErrors
        print(f"ditplan {args.command}: error: {error}", file=sys.stderr)
        return 2
    except VideoWriterError as error:  # the run finished; its metrics and frames are written
        print(f"ditplan {args.command}: error: {error}; metrics.json and frames.png are written",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
