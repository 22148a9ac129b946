"""Train (or resume, or export) ditplan's reference text-to-video DiT on procedural clips.

Typical H100 run, resumable in pieces of under 10 minutes:

    python tools/train_reference.py --out runs/ref --time-budget-min 8 \
        [--resume runs/ref/checkpoint] [--export artifacts/models/ditplan-ref-t2v]

--resume also takes an exported pipeline folder (it has model_index.json): the weights load
exactly as shipped, step, train time and loss curve come from its training_state.json and
loss.csv, AdamW restarts from zero moments and the lr re-warms over --rewarm-steps:

    python tools/train_reference.py --out runs/ref --time-budget-min 8 \
        --resume artifacts/models/ditplan-ref-t2v

Export only (CPU is fine): --resume CKPT --max-steps 0 --export DIR.
CPU smoke test: --smoke --out /tmp/smoke.

The long-sequence model (32 frames x 64 x 64 px, 32,768 tokens) is a fine-tune of the shipped
one; --long sets its recipe (printed by --help) and is meant to be run again and again, one
device call each: it continues <out>/checkpoint if there is one, else starts from the shipped
export, and keeps lean checkpoints (weights only):

    python tools/train_reference.py --long --out OUT --time-budget-min 8

Data-parallel on the GPUs of one host, about 2x faster on 2: the same recipe and the same
batches (each rank trains on its slice of every step's global --batch-size, which must split
evenly), so the same run up to float rounding; rank 0 writes the checkpoint, export and log:

    python -m torch.distributed.run --standalone --nproc-per-node 2 \
        tools/train_reference.py --long --out OUT --time-budget-min 8
"""

from __future__ import annotations

import time

STARTED_AT = time.monotonic()  # the time budget counts from here, imports included

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import logging  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

from ditplan.profiler.commands import tile_type  # noqa: E402
from ditplan.runtime.launch import LaunchError, detect_launch, joined  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SMOKE_DEFAULTS = dict(preset="smoke", device="cpu", compile=False, batch_size=2, max_steps=3,
                      log_every=1, save_every=0, warmup_steps=2, total_steps=20, rewarm_steps=2)
# The long model's fine-tune (issue 15): 800 steps on 16-frame 64 x 64 clips (the final frame
# size, sprite scale and motion per frame at ~4x less compute per clip), then the preset's
# 32-frame clips to step 2,000. Batch 16: activations of ~22 KB per token and layer (saved tensors
# counted on the CPU, eager bf16 autocast) make ~92 GB at 16 x 32,768 tokens, inside an H200's
# 141 GB. A fine-tune's lower lr. Lean checkpoints (~19 MiB) fit a device call beside the wheels;
# AdamW then restarts on every resume, hence a short re-warm.
LONG_DEFAULTS = dict(preset="long", init=ROOT / "artifacts" / "models" / "ditplan-ref-t2v",
                     lean_checkpoint=True, curriculum="16x64x64:800", batch_size=16, lr=2e-4,
                     warmup_steps=100, total_steps=2000, stop_step=2000, rewarm_steps=30,
                     log_every=50, save_every=150)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The flags, with `launch`: this rank of a torchrun launch, None in one process."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="run folder: <out>/checkpoint/")
    p.add_argument("--resume", type=Path,
                   help="checkpoint folder, or exported pipeline folder, to continue from")
    p.add_argument("--init", type=Path,
                   help="fine-tune: start at step 0 from this exported model's weights (any "
                        "preset of the same architecture); if <out>/checkpoint exists, continue "
                        "that instead")
    p.add_argument("--export", type=Path, help="write the diffusers pipeline folder here")
    p.add_argument("--time-budget-min", type=float, help="stop, save and exit within M minutes")
    p.add_argument("--max-steps", type=int, help="stop after this many steps in this run")
    p.add_argument("--stop-at-step", type=int, dest="stop_step",
                   help="end training at this global step, over all runs (a run that starts "
                        "there only exports)")
    p.add_argument("--preset", choices=["reference", "long", "smoke"], default="reference")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--min-lr-ratio", type=float, default=0.1)
    p.add_argument("--warmup-steps", type=int, default=200)
    p.add_argument("--total-steps", type=int, default=4000, help="cosine horizon over all runs")
    p.add_argument("--rewarm-steps", type=int, default=100,
                   help="lr ramp after resuming from an export (AdamW restarts there)")
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--caption-dropout", type=float, default=0.1)
    p.add_argument("--foreground-weight", type=float, default=1.0,
                   help="loss weight of the sprites' pixels, the background's being 1 (> 0)")
    p.add_argument("--concentration-weight", type=float, default=0.0,
                   help="weight of a penalty that raises each self-attention layer's top-20%% "
                        "key-block mass toward --concentration-target (>= 0; 0: off; see "
                        "ditplan/reference/concentration.py)")
    p.add_argument("--concentration-target", type=float, default=0.9,
                   help="the top-20%% block mass the penalty asks for, in (0, 1]")
    p.add_argument("--concentration-over", choices=["heads", "layers"], default="heads",
                   help="apply the target to each head, or to each layer's mean over its heads "
                        "(which lets a layer keep a few diffuse heads)")
    p.add_argument("--concentration-tile", type=tile_type, default=(1, 8, 8),
                   help="the token tile (frames x rows x cols) that orders keys into the "
                        "penalty's blocks: the runtime's --tile the model is meant for")
    p.add_argument("--log-every", type=int, default=25)
    p.add_argument("--save-every", type=int, default=500, help="0 = only at the end")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--clip-frames", type=int,
                   help="frames per training clip (default: the preset's); a short-clip "
                        "curriculum stage, then finish at the preset's frames")
    p.add_argument("--curriculum", metavar="FxHxW:STEP,...",
                   help="clip sizes by global step, e.g. 16x64x64:800 = 16-frame 64 x 64 clips "
                        "before step 800, the preset's after")
    p.add_argument("--lean-checkpoint", action="store_true",
                   help="checkpoints hold the weights only (no AdamW state): a resume restarts "
                        "AdamW and re-warms the lr over --rewarm-steps")
    p.add_argument("--device", help="default: cuda if available, else cpu")
    p.add_argument("--no-compile", dest="compile", action="store_false")
    p.add_argument("--overwrite", action="store_true",
                   help="start from scratch even though <out>/checkpoint exists")
    p.add_argument("--smoke", action="store_true", help="tiny CPU run: " + str(SMOKE_DEFAULTS))
    p.add_argument("--long", action="store_true",
                   help="the long model's fine-tune: " + str(LONG_DEFAULTS))
    args = p.parse_args(argv)
    if args.smoke and args.long:
        p.error("--smoke and --long are two recipes; pick one")
    if args.smoke or args.long:  # recipe values replace the defaults; explicit flags still win
        p.set_defaults(**(SMOKE_DEFAULTS if args.smoke else LONG_DEFAULTS))
        args = p.parse_args(argv)
    if args.max_steps is not None and args.max_steps < 0:
        p.error("--max-steps must be >= 0")
    if args.stop_step is not None and args.stop_step < 1:
        p.error("--stop-at-step must be >= 1")
    if args.clip_frames is not None and args.clip_frames < 2:
        p.error("--clip-frames must be >= 2 (motion needs two frames)")
    if not args.foreground_weight > 0:
        p.error("--foreground-weight must be > 0 (1: plain mean squared error)")
    if args.rewarm_steps < 0:
        p.error("--rewarm-steps must be >= 0")
    if not args.concentration_weight >= 0:
        p.error("--concentration-weight must be >= 0 (0: no penalty)")
    if not 0 < args.concentration_target <= 1:
        p.error("--concentration-target must be in (0, 1] (a share of attention mass)")
    existing = args.out / "checkpoint"
    if existing.exists() and args.resume is None and not args.overwrite:
        if args.init is None:
            p.error(f"{existing} exists: pass --resume {existing} to continue it, or --overwrite")
        args.resume = existing  # a fine-tune that has started continues
    if args.max_steps == 0 and args.export is None:
        p.error("--max-steps 0 only makes sense with --export")
    try:
        args.launch = detect_launch()
    except LaunchError as e:
        p.error(str(e))
    if args.launch is not None:
        from ditplan.reference.training import Shard

        try:
            Shard(args.launch.rank, args.launch.world).share(args.batch_size)
        except ValueError as e:
            p.error(str(e))
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    launch = args.launch
    quiet = launch is not None and not launch.writes_outputs  # rank 0 logs for the run
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO,
                        format="%(asctime)s %(message)s", stream=sys.stdout)
    import torch

    from ditplan.reference.training import Shard, TrainConfig, Trainer

    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    fields = set(TrainConfig.__dataclass_fields__)
    config = TrainConfig(**{k: v for k, v in vars(args).items() if k in fields})
    if launch is None:
        Trainer(config, started_at=STARTED_AT).run()
        return 0
    with joined(launch, config.device or ("cuda" if torch.cuda.is_available() else "cpu")) as dev:
        config = dataclasses.replace(config, device=dev)
        Trainer(config, started_at=STARTED_AT, shard=Shard(launch.rank, launch.world)).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
