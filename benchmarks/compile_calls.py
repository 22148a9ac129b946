"""Per-call wall time of torch.compile(Wan2.1-1.3B-shaped model) with sparse attention applied.

    python -m benchmarks.compile_calls [--layers 30] [--calls 5] [--compile-first]   # CUDA

Shows which calls compile (new dynamo graphs) and when the compiled model settles; with
--compile-first the first call is also the model's first forward (no eager call before it),
the case that crashed on torch 2.11 before the permuter's tables were keyed by plain values.
Not a speed benchmark: benchmarks.forward times the settled model against dense.
"""

from __future__ import annotations

import argparse
import time

import torch

from benchmarks.common import banner
from benchmarks.forward import build, call_counting_graphs
from ditplan.policy.plan import AttentionSpec
from ditplan.runtime.apply import apply_sparse_attention


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=30, help="first N transformer blocks")
    parser.add_argument("--calls", type=int, default=5)
    parser.add_argument("--compile-first", action="store_true",
                        help="no eager forward before the first compiled call")
    parser.add_argument("--quick", action="store_true", help="tiny shapes (CPU smoke run)")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    print(banner(), flush=True)
    model, inputs = build(args.quick, device, dtype)
    model.blocks = model.blocks[: args.layers]
    apply_sparse_attention(model, AttentionSpec(density=0.2, tile=(1, 8, 8)), backend="auto")
    if not args.compile_first:
        with torch.no_grad():
            model(**inputs)
    compiled = torch.compile(model)
    for call in range(args.calls):
        start = time.perf_counter()
        new_graphs = call_counting_graphs(compiled, inputs, device)
        print(f"call {call}: {time.perf_counter() - start:8.2f} s, {new_graphs} new graphs",
              flush=True)


if __name__ == "__main__":
    main()
