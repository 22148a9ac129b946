"""Evaluate ditplan's reference text-to-video DiT on the 64 held-out captions (pixels only).

    python tools/eval_reference.py --model artifacts/models/ditplan-ref-t2v --out runs/eval \
        [--guidance 3 4 6] [--steps 32]

Writes <out>/eval_results.json (caption following, motion coherence, background statistics
for the samples and for data clips of the same captions) and <out>/sample_grid.png.
The clips (size, sprite speeds, backgrounds) are the preset's the model was trained with, read
from its training_state.json (--preset to choose; --frames/--height/--width change the size).
The attention-concentration statistic of issue 3 is not computed here (it needs the kernels).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

PRESETS = ("reference", "long", "smoke")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", type=Path, required=True, help="exported pipeline folder")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--guidance", type=float, nargs="+", default=[4.0])
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--limit", type=int, help="only the first N held-out captions")
    p.add_argument("--preset", choices=PRESETS,
                   help="whose clips to evaluate on (default: the model's training_state.json "
                        "preset, else reference)")
    p.add_argument("--frames", type=int, help="default: the preset's")
    p.add_argument("--height", type=int, help="default: the preset's")
    p.add_argument("--width", type=int, help="default: the preset's")
    p.add_argument("--device", help="default: cuda if available, else cpu")
    p.add_argument("--dtype", choices=["bf16", "fp32"], help="default: bf16 on cuda, else fp32")
    args = p.parse_args(argv)
    from ditplan.reference.checkpoint import CheckpointError
    from ditplan.reference.export import pipeline_preset_name

    try:
        args.preset = pipeline_preset_name(args.model, args.preset)
    except CheckpointError as error:
        p.error(str(error))
    if args.limit is not None and not 1 <= args.limit <= 64:
        p.error("--limit must be in 1..64")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stdout)
    import torch

    from ditplan.reference.config import get_preset
    from ditplan.reference.evaluation import eval_clip, eval_settings, evaluate
    from ditplan.reference.pipeline import ReferenceVideoPipeline

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[
        args.dtype or ("bf16" if device.startswith("cuda") else "fp32")]
    pipe = ReferenceVideoPipeline.from_pretrained(args.model, torch_dtype=dtype).to(device)
    pipe.set_progress_bar_config(disable=True)
    size = {k: getattr(args, k) for k in ("frames", "height", "width")
            if getattr(args, k) is not None}
    settings = eval_settings(steps=args.steps, guidance_scales=tuple(args.guidance),
                             batch_size=args.batch_size, seed=args.seed, limit=args.limit,
                             clip=eval_clip(get_preset(args.preset).clip), **size)
    results = evaluate(pipe, args.out, settings)
    summary = {"data": results["data"],
               **{g: r["samples"] for g, r in results["by_guidance"].items()}}
    logging.getLogger(__name__).info("summary:\n%s", json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
