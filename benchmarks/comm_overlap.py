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
means they do not. On GPUs one more variant:

- ``copy engine``: the real Ulysses layout (each rank projects the columns of every rank's heads
  for its own tokens), through PyTorch's symmetric memory: the chunk a peer needs is projected
  into a buffer that peer reads with a copy-engine copy while this rank projects its own chunk
  (``torch.distributed._symmetric_memory._pipelined_produce_and_all2all``, a private API: the
  row says why if it is unavailable); then the output's exchange in line, as above. Its result
  is checked against the same layout through NCCL (``max|diff|``). NCCL's kernels take SMs from
  the matmuls; a copy engine does not.
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


def layer_inputs(tokens_local: int, hidden: int, device: torch.device,
                 dtype: torch.dtype) -> tuple:
    """A rank's layer input x [S / W, C], the q/k/v weights [C, C] each, and the attention
    output it sends [S / W, C]."""
    x = torch.randn(tokens_local, hidden, device=device, dtype=dtype)
    weights = [torch.randn(hidden, hidden, device=device, dtype=dtype) / hidden**0.5
               for _ in range(3)]
    sent = torch.randn(tokens_local, hidden, device=device, dtype=dtype)
    return x, weights, sent


def layer_fns(x: torch.Tensor, weights: list[torch.Tensor], sent: torch.Tensor) -> dict:
    """The four per-layer variants as functions of no argument."""

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


def copy_engine_fn(x: torch.Tensor, weights: list[torch.Tensor], sent: torch.Tensor):
    """The ``copy engine`` variant and its largest difference from the NCCL exchange of the same
    layout; raises (RuntimeError, ...) when symmetric memory cannot run here."""
    from torch.distributed import _symmetric_memory as symm_mem

    world, group = dist.get_world_size(), dist.group.WORLD.group_name
    if hasattr(symm_mem, "enable_symm_mem_for_group"):  # older torch needs it, newer ignores it
        symm_mem.enable_symm_mem_for_group(group)
    tokens, hidden = x.shape
    # per projection, the columns of each rank's heads: [C, C / W] each
    parts = [[w[:, r * hidden // world:(r + 1) * hidden // world].contiguous()
              for r in range(world)] for w in weights]
    outs = [torch.empty(world * tokens, hidden // world, device=x.device, dtype=x.dtype)
            for _ in weights]  # [W * S / W, C / W]: every rank's tokens, this rank's heads

    def run():
        for w_parts, out in zip(parts, outs, strict=True):
            symm_mem._pipelined_produce_and_all2all(
                lambda rank, buf, w_parts=w_parts: torch.matmul(x, w_parts[rank], out=buf),
                out, group)
        exchange(sent, async_op=False)

    run()
    worst = 0.0
    for w_parts, out in zip(parts, outs, strict=True):
        expected, _ = exchange(torch.cat([x @ w for w in w_parts]), async_op=False)
        worst = max(worst, (out - expected).abs().max().item())
    return run, worst


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
    inputs = layer_inputs(shape["tokens"] // world, shape["hidden"], device, dtype)
    fns = layer_fns(*inputs)
    rows = [{"variant": name, "ms": time_layers(fn, args.layers, args.repeats, device)}
            for name, fn in fns.items()]
    if device.type == "cuda":
        rows.append(_copy_engine_row(inputs, args, device))
    if dist.get_rank() != 0:
        return []  # rank 0 reports
    print(banner(), f"| {world} ranks | {args.layers} layers | "
          f"{shape['tokens'] // world} tokens a rank, hidden {shape['hidden']}")
    for row in rows:
        ms = f"{row['ms']:9.2f} ms" if "ms" in row else f"unavailable: {row['error']}"
        diff = f"  max|diff| vs NCCL {row['max_abs_diff']:.1e}" if "max_abs_diff" in row else ""
        print(f"{row['variant']:<20} {ms}{diff}")
    return rows


def _copy_engine_row(inputs: tuple, args, device: torch.device) -> dict:
    try:
        fn, worst = copy_engine_fn(*inputs)
    except (RuntimeError, ImportError, AttributeError, TypeError) as error:
        return {"variant": "copy engine", "error": f"{type(error).__name__}: {error}"[:300]}
    return {"variant": "copy engine", "ms": time_layers(fn, args.layers, args.repeats, device),
            "max_abs_diff": worst}


if __name__ == "__main__":
    main()
