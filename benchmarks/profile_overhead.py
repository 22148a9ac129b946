"""Profiler overhead on the Wan2.1-1.3B-shaped model (480p x 81 frames, random weights).

Usage: python -m benchmarks.profile_overhead [--steps 2] [--quick]
Times N denoising steps with CFG (two transformer calls a step) plainly and with the profiler
recording every statistic of every layer, in the same run on the same card; reports peak memory.
"""

from __future__ import annotations

import argparse
import json

import torch

from benchmarks.common import banner, timed_once
from benchmarks.forward import build
from ditplan.profiler.config import RecorderSettings
from ditplan.profiler.run import profile_transformer_calls


def plain_steps(model, inputs, steps):
    with torch.no_grad():
        for step in range(steps):
            for context in ("cond", "uncond"):
                with model.cache_context(context, step_index=step):
                    model(**inputs, return_dict=False)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="tiny shapes (CPU smoke run)")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    print(banner(), flush=True)
    model, inputs = build(args.quick, device, dtype)
    inputs.pop("return_dict")  # profile_transformer_calls passes it itself
    plain_steps(model, inputs, 1)  # warm-up
    plain_s, plain_peak = timed_once(lambda: plain_steps(model, inputs, args.steps), device)
    settings = RecorderSettings(map_steps=(0,))

    def profiled():
        rows = profile_transformer_calls(
            model, inputs, steps=args.steps, settings=settings, contexts=("cond", "uncond")
        )
        rows.columns()  # copy every table to the host, as the writer does

    profiled_s, profiled_peak = timed_once(profiled, device)
    result = dict(
        banner=banner(),
        steps=args.steps,
        plain_s=plain_s,
        profiled_s=profiled_s,
        overhead=profiled_s / plain_s,
        plain_peak_gib=plain_peak,
        profiled_peak_gib=profiled_peak,
    )
    print(f"{'run':<10} {'s':>8} {'peak GiB':>9}")
    print(f"{'plain':<10} {plain_s:8.2f} {plain_peak:9.2f}")
    print(
        f"{'profiled':<10} {profiled_s:8.2f} {profiled_peak:9.2f}   {result['overhead']:.2f}x time"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
