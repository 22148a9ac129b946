"""Estimate, on the CPU, how concentrated a reference model's self-attention is under several
tile shapes: the top-20% key-block mass per layer and head, from one forward per noise level on
the model's own training clips (no GPU profile needed; ~3 minutes a noise level for the long
model on two cores). The tile orders tokens into blocks, so it sets what block sparsity can keep.

    python tools/tile_concentration.py artifacts/models/ditplan-ref-t2v-long \
        [--tiles 1x8x8 2x8x8 4x4x8 8x4x4] [--sigmas 0.9 0.6 0.3] [--json out.json]

The clips are the preset's the model was trained with (its training_state.json; --preset to
choose). Compare with the GPU profile (`ditplan profile --no-sink --mode sample`, then
tools/attention_concentration.py) at its tile: on the long models the medians agreed within
0.012.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ditplan.policy.atomic import atomic_write_text
from ditplan.profiler.commands import tile_type

PRESETS = ("reference", "long", "smoke")


def _sigma(text: str) -> float:
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"a noise level is in (0, 1], got {text}")
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("model", type=Path, help="an exported pipeline folder")
    p.add_argument("--tiles", type=tile_type, nargs="+",
                   default=[(1, 8, 8), (2, 8, 8), (4, 4, 8), (8, 4, 4)])
    p.add_argument("--sigmas", type=_sigma, nargs="+", default=[0.9, 0.6, 0.3],
                   help="noise levels, one forward each (early, middle, late steps)")
    p.add_argument("--clips", type=int, default=1, help="training clips per forward")
    p.add_argument("--query-blocks", type=int, default=24,
                   help="query blocks drawn per tile, noise level and layer")
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--density", type=float, default=0.2, help="share of key blocks kept")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--preset", choices=PRESETS,
                   help="whose training clips (default: the model's training_state.json)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", type=Path, help="also write the numbers here")
    args = p.parse_args(argv)
    from ditplan.reference.checkpoint import CheckpointError
    from ditplan.reference.export import pipeline_preset_name

    try:
        args.preset = pipeline_preset_name(args.model, args.preset)
    except CheckpointError as error:
        p.error(str(error))
    for name in ("clips", "query_blocks", "block_size"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if not 0 < args.density <= 1:
        p.error("--density must be in (0, 1]")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    from ditplan.reference.clips import generate_clips
    from ditplan.reference.config import get_preset
    from ditplan.reference.pipeline import ReferenceVideoPipeline
    from ditplan.reference.tile_concentration import estimate_tile_concentration

    preset = get_preset(args.preset)
    pipe = ReferenceVideoPipeline.from_pretrained(args.model).to(args.device)
    clips = generate_clips(args.clips, args.seed, device=args.device, spec=preset.clip)
    x0 = clips.video  # [B, 3, F, H, W]
    with torch.no_grad():
        embeds = pipe.text_encoder(pipe.text_encoder.tokenizer.encode(clips.captions)
                                   .to(args.device))  # [B, L, text_dim]
    grid = preset.token_grid(*x0.shape[2:])
    result = estimate_tile_concentration(
        pipe.transformer, embeds, x0, grid, tiles=args.tiles, sigmas=args.sigmas,
        query_blocks=args.query_blocks, seed=args.seed, block_size=args.block_size,
        density=args.density, progress=True)
    print(f"top-{args.density:.0%} block mass of {args.model} ({args.preset} clips, "
          f"{grid[0] * grid[1] * grid[2]} tokens, blocks of {args.block_size}), noise levels "
          f"{list(result.sigmas)}, {result.query_blocks} query blocks each")
    print(result.markdown())
    if args.json:
        atomic_write_text(args.json, json.dumps(result.as_dict(), indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
