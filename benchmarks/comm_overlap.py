"""Can Ulysses' all-to-alls hide behind the q/k/v projections? A 2-rank micro-benchmark.

    torchrun --nproc-per-node 2 -m benchmarks.comm_overlap [--layers 30] [--repeats 5]
    --quick: tiny sizes on CPU over gloo (a smoke run)

Issue 16's profile puts about 21 ms of in-line all-to-all in each 2-GPU Wan2.1-1.3B forward
(120 calls of 25 MiB per rank). Whether a ditplan-side Ulysses that sends q while k and v are
still being projected could win that time back depends on how well NCCL and the matmuls share
the card. Per layer, at the rank's shard of that model (S / W tokens, hidden 1536, 12 heads of
128, bf16), this times, for --layers layers (ms, median of --repeats, the slowest rank's):

- ``all-to-all x4``: the q, k, v and output exchanges alone, in line (what diffusers does);
- ``q/k/v projections``: three [S / W, 1536] x [1536, 1536] matmuls alone;
- ``in line``: each projection, then its all-to-all, waited before the next projection;
- ``overlapped``: each projection's all-to-all issued asynchronously as soon as it exists, all
  three waited after the last projection (the output exchange stays in line, as it must).

``overlapped`` near ``projections + one exchange`` means the exchanges hide; near ``in line``
means they do not.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.distributed as dist

from benchmarks.common import banner
from benchmarks.parallel import setup

WAN_13B = dict(tokens=32760, hidden=1536)
QUICK = dict(tokens=64, hidden=32)


def exchange(x: torch.Tensor, async_op: bool):
    """All-to-all of x ([W * n, ...], part w to rank w); (received, work or None)."""
    received = torch.empty_like(x)
    work = dist.all_to_all_single(received, x, async_op=async_op)
    return received, work


def layer_fns(tokens_local: int, hidden: int, device: torch.device, dtype: torch.dtype) -> dict:
    """The four per-layer variants as functions of no argument."""
    x = torch.randn(tokens_local, hidden, device=device, dtype=dtype)  # [S / W, C]
    weights = [torch.randn(hidden, hidden, device=device, dtype=dtype) / hidden**0.5
               for _ in range(3)]
    sent = torch.randn(tokens_local, hidden, device=device, dtype=dtype)  # [S / W, C]

    def exchanges():
        for _ in range(4):
            exchange(sent, async_op=False)

    def projections():
        for w in weights:
            x @ w

    def in_line():
        for w in weights:
            exchange(x @ w, async_op=False)
        exchange(sent, async_op=False)

    def overlapped():
        works = [exchange(x @ w, async_op=True)[1] for w in weights]
        for work in works:
            work.wait()
        exchange(sent, async_op=False)

    return {"all-to-all x4": exchanges, "q/k/v projections": projections, "in line": in_line,
            "overlapped": overlapped}


def time_layers(fn, layers: int, repeats: int, device: torch.device) -> float:
    """Median ms of `layers` calls of fn over `repeats` runs after one warm-up, slowest rank."""
    times = []
    for run in range(repeats + 1):
        if device.type == "cuda":
            torch.cuda.synchronize()
        dist.barrier()  # the ranks start each run together
        began = time.perf_counter()
        for _ in range(layers):
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if run:
            times.append((time.perf_counter() - began) * 1e3)
    slowest = torch.tensor([statistics.median(times)], dtype=torch.float64, device=device)
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
    return float(slowest)


def main(argv: list[str] | None = None) -> list[dict]:
    """Times the four variants; rank 0 prints and returns the rows (``variant``, ``ms``)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="tiny sizes on CPU (gloo)")
    args = parser.parse_args(argv)
    if not dist.is_initialized() and "RANK" not in os.environ:
        parser.error("launch with torchrun --nproc-per-node 2 (or more): it times collectives")
    device = setup()
    shape = QUICK if args.quick or device.type == "cpu" else WAN_13B
    world = dist.get_world_size()
    if shape["tokens"] % world:
        parser.error(f"{shape['tokens']} tokens do not split over {world} ranks")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    fns = layer_fns(shape["tokens"] // world, shape["hidden"], device, dtype)
    rows = [{"variant": name, "ms": time_layers(fn, args.layers, args.repeats, device)}
            for name, fn in fns.items()]
    if dist.get_rank() != 0:
        return []  # rank 0 reports
    print(banner(), f"| {world} ranks | {args.layers} layers | "
          f"{shape['tokens'] // world} tokens a rank, hidden {shape['hidden']}")
    for row in rows:
        print(f"{row['variant']:<20} {row['ms']:9.2f} ms")
    return rows


if __name__ == "__main__":
    main()
