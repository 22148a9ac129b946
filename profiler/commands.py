"""CLI glue for `ditplan profile` (registered by runtime/cli.py); torch is imported only to run.

The handler takes the parsed argparse Namespace and returns an exit code: 0 on success, 1 when
the input is rejected (message on stderr), 2 for malformed flag values, 130 when interrupted.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from ditplan.profiler.config import BLOCK_SIZES, DEFAULT_FRAMES, DTYPES, MODES, ProfileConfig
from ditplan.runtime.pipeline_calls import GUIDANCE_HELP

_DEFAULTS = ProfileConfig(out=Path("."))
SINK_CHOICES = {"auto": None, "on": True, "off": False}  # --sink -> ProfileConfig.sink


def register(subparsers) -> None:
    """Add the ``profile`` subcommand; its parser sets ``handler`` (``args.handler(args)``)."""
    p = subparsers.add_parser(
        "profile", help="record what a DiT's attention and layers do (Parquet traces)",
        description="Run a diffusers pipeline with dense attention and record attention "
                    "sparsity, foreground focus and step-to-step change per layer, head and "
                    "step. Rerunning the same command resumes an interrupted run. A Wan2.2 "
                    "two-expert pipeline (transformer_2, boundary_ratio) gets a trace folder "
                    "per expert under --out and experts.json (the steps each expert ran).",
    )
    p.add_argument("--model", default=_DEFAULTS.model,
                   help="'reference' (built-in), a local diffusers folder, or a hub id")
    p.add_argument("--prompts", nargs="+", default=list(_DEFAULTS.prompts), metavar="FILE|TEXT",
                   help="prompts, or text files with one prompt per line")
    p.add_argument("--steps", type=int, default=_DEFAULTS.steps)
    p.add_argument("--height", type=int, default=_DEFAULTS.height, help="pixels")
    p.add_argument("--width", type=int, default=_DEFAULTS.width, help="pixels")
    p.add_argument("--frames", type=int, default=None,
                   help=f"video pipelines (default {DEFAULT_FRAMES}); image pipelines (FLUX.1, "
                        "Qwen-Image) make one frame: leave it out")
    p.add_argument("--seeds", type=int, nargs="+", default=list(_DEFAULTS.seeds))
    p.add_argument("--guidance-scale", type=float, default=_DEFAULTS.guidance_scale,
                   help=GUIDANCE_HELP)
    p.add_argument("--out", type=Path, required=True, help="trace folder (created; resumable)")
    p.add_argument("--device", default=None, help="torch device (default: cuda if present)")
    p.add_argument("--dtype", choices=DTYPES, default=None,
                   help="weights dtype (default: float32 on CPU, bfloat16 otherwise)")
    p.add_argument("--mode", choices=MODES, default=_DEFAULTS.mode,
                   help="clip: reference model on noised reference clips (ground-truth "
                        "foreground); sample: real sampler, estimated foreground")
    p.add_argument("--block-size", type=int, choices=BLOCK_SIZES, default=_DEFAULTS.block_size)
    p.add_argument("--tile", default="x".join(map(str, _DEFAULTS.tile)), metavar="TxHxW",
                   help="token permutation tile, e.g. 1x8x8")
    p.add_argument("--map-steps", type=int, nargs="*", default=None, metavar="STEP",
                   help="steps whose block-pooled attention maps are stored "
                        "(default: first, middle, last)")
    p.add_argument("--attention-steps", type=int, nargs="+", default=None, metavar="STEP",
                   help="steps whose attention statistics are computed (default: all; they "
                        "cost ~20x a forward, so at full size profile a few, e.g. 0 24 49)")
    p.add_argument("--output-error", action="store_true",
                   help="also measure sparse attention's output error against dense per head "
                        "and density (dropped blocks left out and estimated; ~20%% more time)"
                        "; compile-policy then charges each sparse layer this error rather "
                        "than the attention mass it drops, and --estimate-dropped measured reads "
                        "it")
    p.add_argument("--attn-threshold", type=float, default=_DEFAULTS.attn_threshold,
                   help="high-attention token: mean received mass > threshold / tokens")
    p.add_argument("--sink", choices=SINK_CHOICES, default="auto",
                   help="force the blocks holding first-frame tokens into the recall masks, as "
                        "the runtime then does (auto: only for a tile one frame deep; a deeper "
                        "tile's first tile-frame would be forced whole)")
    p.add_argument("--no-sink", dest="sink", action="store_const", const="off",
                   help="same as --sink off")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(handler=run_profile)


def parse_tile(text: str) -> tuple[int, int, int]:
    """'1x8x8' or '1,8,8' -> (1, 8, 8); ValueError naming the expected form."""
    parts = re.split(r"[x,]", text.strip().lower())
    if len(parts) != 3 or not all(p.isdigit() and int(p) >= 1 for p in parts):
        raise ValueError(f"tile {text!r}: expected three positive ints TxHxW (frames x rows x "
                         "cols of tokens), e.g. 1x8x8")
    return tuple(int(p) for p in parts)


def tile_type(text: str) -> tuple[int, int, int]:
    """parse_tile as an argparse ``type=`` (its message, not argparse's "invalid value")."""
    try:
        return parse_tile(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from error


def read_prompts(items: list[str]) -> tuple[str, ...]:
    """Each item is a prompt, or an existing file holding one prompt per non-empty line."""
    prompts = []
    for item in items:
        path = Path(item)
        if path.is_file():
            lines = [line.strip() for line in path.read_text().splitlines()]
            found = [line for line in lines if line]
            if not found:
                raise ValueError(f"--prompts file {path} has no prompts")
            prompts.extend(found)
        else:
            prompts.append(item)
    return tuple(prompts)


def config_from_args(args: argparse.Namespace) -> ProfileConfig:
    """The ProfileConfig the flags describe (ValueError / ProfileConfigError when malformed)."""
    return ProfileConfig(
        out=args.out, model=args.model, prompts=read_prompts(args.prompts),
        seeds=tuple(args.seeds), steps=args.steps, height=args.height, width=args.width,
        frames=args.frames, guidance_scale=args.guidance_scale, device=args.device,
        dtype=args.dtype, mode=args.mode, block_size=args.block_size,
        tile=parse_tile(args.tile), sink=SINK_CHOICES[args.sink],
        map_steps=None if args.map_steps is None else tuple(args.map_steps),
        attention_steps=None if args.attention_steps is None else tuple(args.attention_steps),
        attn_threshold=args.attn_threshold, output_error=args.output_error,
        progress=not args.no_progress,
    )


def run_profile(args: argparse.Namespace) -> int:
    """Handler of ``profile``: prompts x seeds -> traces + report.png. Returns the exit code."""
    try:
        config = config_from_args(args)
    except (ValueError, OSError) as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 2
    from ditplan.profiler.run import profile_pipeline

    try:
        files = profile_pipeline(config)
    except KeyboardInterrupt:
        sys.stderr.write(f"interrupted; finished prompts are saved in {config.out}, rerun the "
                         "same command to resume\n")
        return 130
    except (ValueError, OSError) as exc:  # ProfileDirError, TraceError, CaptionParseError, ...
        sys.stderr.write(f"error: {exc}\n")
        return 1
    traces = [f for f in files if f.suffix == ".parquet"]
    reports = " and ".join(str(f) for f in files if f.suffix == ".png")
    sys.stdout.write(f"wrote {len(traces)} trace files and {reports} under {config.out}\n")
    return 0
