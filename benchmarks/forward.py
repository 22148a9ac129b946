"""Wan2.1-1.3B-shaped transformer forward (480p x 81 frames): dense vs block-mean sparse attention.

Usage: python benchmarks/forward.py [--densities 0.5 0.2 0.1] [--backends flex fa4] [--compile]
       [--unfused-too] [--estimate-too] [--profile DIR] [--quick]
Times every variant in the same run on the same card and prints ratios against dense; each
backend named in --backends (default auto) gets its sparse rows, one it can't run here none.
``--unfused-too`` adds each backend's first d=0.2 row with the q/k norm + rotary run eager
(DITPLAN_FUSED_QK=0), so the share of the compiled q/k kernel in the speedup shows.
``--estimate-too`` adds each sparse row with every head estimating its dropped key blocks from
block means (``AttentionSpec.estimate_heads``), so the estimate's cost shows.
``--profile DIR`` writes each variant's profiled forward (time by kind, top ops) to DIR.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import time

import torch
from diffusers import WanTransformer3DModel

from benchmarks.common import (
    WAN_1_3B,
    WAN_480P_LATENTS,
    WAN_TEXT_TOKENS,
    banner,
    compile_until_settled,
    graphs_compiled_by,
    peak_memory_gib,
    time_ms,
)
from benchmarks.forward_profile import profile_call, write_profile
from ditplan.policy.plan import AttentionSpec
from ditplan.runtime.apply import apply_sparse_attention
from ditplan.runtime.kernels.registry import backend_spec
from ditplan.runtime.kernels.wan_qk import ENV_SWITCH

QUICK_CONFIG = dict(
    WAN_1_3B, num_attention_heads=2, attention_head_dim=32, ffn_dim=128, num_layers=2, text_dim=64
)


def build(quick: bool, device: str, dtype: torch.dtype):
    config = QUICK_CONFIG if quick else WAN_1_3B
    latents_shape = (1, 16, 3, 16, 32) if quick else WAN_480P_LATENTS
    text_len = 8 if quick else WAN_TEXT_TOKENS
    with torch.device(device):
        model = WanTransformer3DModel(**config).to(dtype).eval()
        inputs = dict(
            hidden_states=torch.randn(latents_shape, dtype=dtype),
            timestep=torch.tensor([500.0]),
            encoder_hidden_states=torch.randn(1, text_len, config["text_dim"], dtype=dtype),
            return_dict=False,
        )
    return model, inputs


def measure(model, inputs, label, rows, repeats, profile_dir=None):
    def forward():
        with torch.no_grad():
            model(**inputs)

    ms = time_ms(forward, repeats=repeats)
    rows.append(dict(variant=label, ms=ms, peak_gib=peak_memory_gib(forward)))
    print(f"  {label:<40} {ms:9.1f} ms", flush=True)
    if profile_dir:  # after the timing, so the profiler's cost stays out of it
        write_profile(profile_dir, label, profile_call(forward, inputs["hidden_states"].device))


def call_counting_graphs(compiled, inputs, device: str) -> int:
    """One synchronized no-grad call of a compiled model; returns how many new dynamo graphs
    it compiled."""

    def call():
        with torch.no_grad():
            compiled(**inputs)
        if device == "cuda":
            torch.cuda.synchronize()

    return graphs_compiled_by(call)


def warm_up_compiled(compiled, inputs, device: str, max_calls: int = 6) -> int:
    """Call until a call compiles no new graph (:func:`compile_until_settled`); returns how many
    calls compiled something."""
    return compile_until_settled(lambda: call_counting_graphs(compiled, inputs, device),
                                 max_calls)[0]


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--densities", type=float, nargs="+", default=[0.5, 0.2, 0.1])
    parser.add_argument("--tiles", nargs="+", default=["1,8,8", "1,1,1"])
    parser.add_argument("--compile", action="store_true", help="also time torch.compile(model)")
    parser.add_argument("--backends", nargs="+", default=["auto"],
                        help="kernel backends of the sparse rows (auto, fa4, flex, torch)")
    parser.add_argument("--unfused-too", action="store_true",
                        help="also time d=0.2 with the q/k norm + rotary eager")
    parser.add_argument("--estimate-too", action="store_true",
                        help="also time each sparse row with dropped blocks estimated")
    parser.add_argument("--profile", metavar="DIR",
                        help="also profile one forward per variant into DIR/profile-*.txt")
    parser.add_argument("--quick", action="store_true", help="tiny shapes (CPU smoke run)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    print(banner(), flush=True)
    model, inputs = build(args.quick, device, dtype)
    rows: list[dict] = []
    backends = [b for b in args.backends if _runs_here(b, device)]
    variants = [("dense", None, None)] + [
        (f"sparse d={d} tile={t} {b}",
         AttentionSpec(density=d, tile=tuple(map(int, t.split(",")))), b)
        for b in backends
        for d in args.densities
        for t in args.tiles
    ]
    if args.estimate_too:
        heads = (True,) * model.config.num_attention_heads
        variants += [(f"{label} estimated", dataclasses.replace(spec, estimate_heads=heads), b)
                     for label, spec, b in variants if spec is not None]
    first_tile = tuple(map(int, args.tiles[0].split(",")))
    if args.unfused_too:
        variants += [(f"sparse d=0.2 tile={args.tiles[0]} {b} unfused q/k",
                      AttentionSpec(density=0.2, tile=first_tile), b) for b in backends]
    compiled_labels = ["dense"] + [f"sparse d=0.2 tile={args.tiles[0]} {b}" for b in backends]
    for label, spec, backend in variants:
        handle = apply_sparse_attention(model, spec, backend=backend) if spec else None
        with _fused_qk(not label.endswith("unfused q/k")):
            measure(model, inputs, label, rows, args.repeats, args.profile)
        if args.compile and label in compiled_labels:
            compiled = torch.compile(model)
            start = time.perf_counter()
            compiling_calls = warm_up_compiled(compiled, inputs, device)
            compile_s = time.perf_counter() - start
            print(f"  {label} + torch.compile: {compiling_calls} calls compiled graphs, "
                  f"{compile_s:.1f} s", flush=True)
            measure(compiled, inputs, f"{label} + torch.compile", rows, args.repeats)
            rows[-1].update(compile_s=compile_s, compiling_calls=compiling_calls)
            torch._dynamo.reset()
        if handle:
            handle.remove()
    report(rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(banner=banner(), rows=rows), f, indent=1)
    return rows


@contextlib.contextmanager
def _fused_qk(on: bool):
    """The compiled q/k norm + rotary on (the default) or off (its environment switch)."""
    before = os.environ.get(ENV_SWITCH)
    os.environ[ENV_SWITCH] = "1" if on else "0"
    try:
        yield
    finally:
        if before is None:
            del os.environ[ENV_SWITCH]
        else:
            os.environ[ENV_SWITCH] = before


def _runs_here(backend: str, device: str) -> bool:
    """False (and says why) for a backend that would only fall back to another one here."""
    if backend == "auto":
        return True
    spec = backend_spec(backend)
    if spec.is_available(torch.device(device)):
        return True
    print(f"  backend {backend}: not timed ({spec.reason(torch.device(device))})", flush=True)
    return False


def report(rows):
    dense = next(r for r in rows if r["variant"] == "dense")
    dense_c = next((r for r in rows if r["variant"] == "dense + torch.compile"), dense)
    print(f"\n{'variant':<40} {'ms':>9} {'vs dense':>9} {'peak GiB':>9} {'peak vs dense':>14}")
    for r in rows:
        base = dense_c if "compile" in r["variant"] else dense
        extra_mib = (r["peak_gib"] - base["peak_gib"]) * 1024
        print(f"{r['variant']:<40} {r['ms']:9.1f} {base['ms'] / r['ms']:8.2f}x "
              f"{r['peak_gib']:9.3f} {extra_mib:+10.1f} MiB")


if __name__ == "__main__":
    main()
