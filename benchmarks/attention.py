"""Benchmark: ditplan's sparse attention op vs dense SDPA at the Wan2.1-1.3B 480p x 81-frame shape.

    python -m benchmarks.attention [--json out.json]      # H100: bf16, B=1, H=12, S=32,760, D=128
    python -m benchmarks.attention --quick                # CPU smoke run on a small shape

Every number comes from one run on one device: dense F.scaled_dot_product_attention, then the
full sparse op (tile-permute q/k/v, block-mean selection with a first-frame sink, block-sparse
kernel, inverse permute) at density 0.5 / 0.2 / 0.1, the same with selection by the loop
reference twin, and each part alone. Random inputs: timings do not depend on the values at a
fixed density, but which tile predicts attention best can't be judged on random weights, so the
tile shapes are only timed. Timing: triton.testing.do_bench medians (CUDA events without triton;
perf_counter medians on CPU).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from benchmarks.common import time_ms
from ditplan.runtime.kernels import (
    block_sparse_attention,
    first_frame_mask,
    forced_blocks,
    invert_permutation,
    masked_attention_reference,
    select_blocks,
    select_blocks_reference,
    tile_permutation,
)

BLOCK_SIZE = 128
DENSITIES = (0.5, 0.2, 0.1)
TILES = ((1, 8, 8), (1, 8, 16), (2, 8, 8), (1, 16, 16))


@dataclass(frozen=True)
class Workload:
    grid: tuple[int, int, int]  # (frames, height, width) in tokens
    heads: int
    head_dim: int
    dtype: torch.dtype
    device: torch.device
    backend: str

    @property
    def seq_len(self) -> int:
        return self.grid[0] * self.grid[1] * self.grid[2]


FULL = dict(grid=(21, 30, 52), heads=12, head_dim=128, dtype=torch.bfloat16)  # S = 32,760
QUICK = dict(grid=(3, 16, 20), heads=2, head_dim=32, dtype=torch.float32)  # S = 960


def median_ms(fn: Callable[[], object], device: torch.device) -> float:
    """Median time of fn() in ms: triton's do_bench on CUDA, else benchmarks.common.time_ms."""
    if device.type == "cuda":
        try:
            from triton.testing import do_bench
        except ImportError:
            return time_ms(fn, warmup=5, repeats=30)
        return float(do_bench(fn, warmup=50, rep=300, return_mode="median"))
    return time_ms(fn, warmup=1, repeats=5)


def peak_mib(fn: Callable[[], object], device: torch.device) -> dict[str, float | None]:
    """GPU memory while fn() runs, MiB: `peak` (max_memory_allocated, everything live) and
    `extra` (peak minus what was allocated before the call: what the op itself needs)."""
    if device.type != "cuda":
        return {"peak": None, "extra": None}
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    return {"peak": peak / 2**20, "extra": (peak - before) / 2**20}


class SparseOp:
    """Full op for one tile shape: permute, select (first-frame sink), attend, unpermute."""

    def __init__(self, work: Workload, tile: tuple[int, int, int], sink: bool = True):
        self.work = work
        self.perm = tile_permutation(work.grid, tile, device=work.device)  # [S]
        self.inverse = invert_permutation(self.perm)  # [S]
        sink_tokens = first_frame_mask(work.grid, device=work.device)[self.perm] if sink else None
        self.forced = forced_blocks(work.seq_len, BLOCK_SIZE, sink_tokens=sink_tokens,
                                    device=work.device)

    def permute(self, q, k, v):
        return (x.index_select(2, self.perm) for x in (q, k, v))  # [B, H, S, D] each

    def select(self, q, k, density, select_fn=select_blocks):
        return select_fn(q, k, block_size=BLOCK_SIZE, density=density, forced=self.forced)

    def attend(self, q, k, v, block_map):
        return block_sparse_attention(q, k, v, block_map, block_size=BLOCK_SIZE,
                                      backend=self.work.backend)

    def __call__(self, q, k, v, density, select_fn=select_blocks):
        q, k, v = self.permute(q, k, v)
        block_map = self.select(q, k, density, select_fn)  # [B, H, Qb, Kb]
        return self.attend(q, k, v, block_map).index_select(2, self.inverse)


def make_inputs(work: Workload, seq_len: int | None = None, heads: int | None = None):
    shape = (1, heads or work.heads, seq_len or work.seq_len, work.head_dim)
    return [torch.randn(shape, dtype=work.dtype, device=work.device) for _ in range(3)]


def timing_cases(work: Workload, q, k, v) -> list[tuple[str, Callable[[], object], float]]:
    """(name, fn, achieved density) for every timed case; density 1.0 for dense ops."""
    op = SparseOp(work, (1, 8, 8))
    qp, kp, vp = op.permute(q, k, v)
    cases = [("dense SDPA", lambda: F.scaled_dot_product_attention(q, k, v), 1.0)]
    for density in DENSITIES:
        block_map = op.select(qp, kp, density)
        achieved = block_map.float().mean().item()
        cases += [
            (f"full op d={density}", lambda d=density: op(q, k, v, d), achieved),
            (f"full op, reference selection d={density}",
             lambda d=density: op(q, k, v, d, select_blocks_reference), achieved),
            (f"kernel alone d={density}",
             lambda m=block_map: op.attend(qp, kp, vp, m), achieved),
            (f"selection alone d={density}", lambda d=density: op.select(qp, kp, d), achieved),
        ]
    no_sink = SparseOp(work, (1, 8, 8), sink=False)
    achieved = no_sink.select(qp, kp, 0.2).float().mean().item()
    cases.append(("full op d=0.2, no sink", lambda: no_sink(q, k, v, 0.2), achieved))
    cases.append(("permutation alone (q,k,v + out)",
                  lambda: [x.index_select(2, op.inverse) for x in op.permute(q, k, v)], 1.0))
    for tile in TILES:
        tiled = SparseOp(work, tile)
        achieved = tiled.select(*list(tiled.permute(q, k, v))[:2], 0.2).float().mean().item()
        cases.append((f"full op d=0.2 tile {tile}", lambda t=tiled: t(q, k, v, 0.2), achieved))
    return cases


def correctness(work: Workload, q, k, v) -> dict[str, float]:
    """Relative errors: kernel at density 1.0 vs dense SDPA (full shape); kernel vs the masked
    float64 reference on a smaller sequence with a partial tail block."""
    ones = torch.ones(1, 1, *(2 * [-(-work.seq_len // BLOCK_SIZE)]), dtype=torch.bool,
                      device=work.device)
    dense = F.scaled_dot_product_attention(q, k, v).float()
    sparse = block_sparse_attention(q, k, v, ones, backend=work.backend).float()
    small_seq = min(work.seq_len, 4000) - 37  # not a multiple of the block size
    qs, ks, vs = make_inputs(work, seq_len=small_seq, heads=2)
    block_map = select_blocks(qs, ks, block_size=BLOCK_SIZE, density=0.2)
    out = block_sparse_attention(qs, ks, vs, block_map, backend=work.backend).double()
    ref = masked_attention_reference(qs.double(), ks.double(), vs.double(), block_map,
                                     block_size=BLOCK_SIZE)
    return {"density1_vs_sdpa_rel_err": ((sparse - dense).norm() / dense.norm()).item(),
            f"vs_masked_reference_S{small_seq}_rel_err": ((out - ref).norm() / ref.norm()).item()}


def run(work: Workload) -> dict:
    torch.manual_seed(0)
    q, k, v = make_inputs(work)
    results = {"torch": torch.__version__, "device": _device_name(work.device),
               "shape": [1, work.heads, work.seq_len, work.head_dim], "grid": list(work.grid),
               "dtype": str(work.dtype), "backend": work.backend, "block_size": BLOCK_SIZE,
               "correctness": correctness(work, q, k, v), "cases": []}
    for name, fn, achieved in timing_cases(work, q, k, v):
        results["cases"].append({"name": name, "ms": median_ms(fn, work.device),
                                 "density": achieved, "memory_mib": peak_mib(fn, work.device)})
    dense_ms = results["cases"][0]["ms"]
    for case in results["cases"]:
        case["speedup_vs_dense"] = dense_ms / case["ms"]
    return results


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def format_report(results: dict) -> str:
    lines = [f"torch {results['torch']} on {results['device']}; shape {results['shape']} "
             f"(grid {results['grid']}), {results['dtype']}, backend {results['backend']}, "
             f"block {results['block_size']}"]
    lines += [f"  {name}: {value:.2e}" for name, value in results["correctness"].items()]
    lines.append(f"{'case':<44} {'ms':>9} {'vs dense':>9} {'density':>8} {'extra MiB':>10}")
    for case in results["cases"]:
        extra = case["memory_mib"]["extra"]
        extra = "-" if extra is None else f"{extra:.0f}"
        lines.append(f"{case['name']:<44} {case['ms']:>9.3f} {case['speedup_vs_dense']:>8.2f}x "
                     f"{case['density']:>8.3f} {extra:>10}")
    lines.append("extra MiB: peak allocated during the case minus what was live before it "
                 "(inputs excluded); JSON has the absolute peak too.")
    return "\n".join(lines)


def write_json(path: str, results: dict) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    with tempfile.NamedTemporaryFile("w", dir=folder, suffix=".tmp", delete=False) as tmp:
        json.dump(results, tmp, indent=2)
    os.replace(tmp.name, path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small CPU shape, torch backend")
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    if args.quick:
        work = Workload(**QUICK, device=torch.device("cpu"), backend="torch")
    elif not torch.cuda.is_available():
        parser.error("the full benchmark needs a CUDA GPU; use --quick on CPU")
    else:
        work = Workload(**FULL, device=torch.device("cuda"), backend="flex")
    results = run(work)
    print(format_report(results))
    if args.json:
        write_json(args.json, results)


if __name__ == "__main__":
    main()
