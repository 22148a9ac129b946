"""Benchmark: ditplan's sparse attention op vs dense SDPA at the Wan2.1-1.3B 480p x 81-frame shape.

    python -m benchmarks.attention [--json out.json]      # H100: bf16, B=1, H=12, S=32,760, D=128
    python -m benchmarks.attention --backends flex fa4 --core   # fa4 rows beside flex's
    python -m benchmarks.attention --quick                # CPU smoke run on a small shape

Every number comes from one run on one device. Density is the share of block pairs computed,
the forced first-frame sink and diagonal included (select_blocks' budget). Cases:
- "runtime op": what one sparse layer costs as the runtime runs it: block-mean selection +
  kernel on tokens that are already in tile order (the runtime permutes hidden states and rotary
  tables once per transformer forward); "permutation per forward" is that once-per-forward cost
  ([1, S, 1536] hidden states in and out), and the report adds 1/30 of it (Wan2.1-1.3B's 30
  layers) to the runtime op;
- "full op, per-call permutation": q, k, v permuted and the output un-permuted on every call;
- the kernel alone, the selection alone, the reference (loop) selection, no sink, and a sweep of
  flex kernel options for the kernel at density 0.2 (`--core` keeps dense, the runtime op, the
  kernel and the selection per backend and density, and the permutations).
Each timed backend (`--backends`, default flex) gets its rows, named with the backend. For fa4
the runtime op selects kept-block lists straight from top-k (no bool map), "kernel alone" turns
a bool map into lists and runs the kernel, and "kernel on given lists" is the kernel by itself.
Random inputs: timings do not depend on the values at a fixed density. Timing:
triton.testing.do_bench medians (CUDA events without triton; perf_counter medians on CPU).
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
    lists_from_map,
    masked_attention_reference,
    registry,
    select_and_attend,
    select_block_lists,
    select_blocks,
    select_blocks_reference,
    tile_permutation,
)
from ditplan.runtime.kernels.fa4 import fa4_attention_from_lists
from ditplan.runtime.kernels.flex import flex_block_sparse_attention

BLOCK_SIZE = 128
DENSITIES = (0.5, 0.2, 0.1)
LAYERS = 30  # Wan2.1-1.3B: the per-forward permutation is shared by this many layers
MODEL_WIDTH = 1536  # Wan2.1-1.3B hidden size: what the per-forward permutation moves
KERNEL_OPTIONS = (  # flex settings tried for the kernel at density 0.2 (None: ditplan's defaults)
    None,
    {"USE_TMA": False},
    {"BLOCK_M": 128, "BLOCK_N": 128, "num_warps": 8, "num_stages": 2},
    {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 3},
    {"BLOCK_M": 64, "BLOCK_N": 128, "num_warps": 4, "num_stages": 3},
    {"USE_TMA": True, "BLOCK_M": 128, "BLOCK_N": 128, "num_warps": 8, "num_stages": 2},
    {"USE_TMA": True, "BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 4},
    {"USE_TMA": True, "BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3},
)


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

    def select_lists(self, q, k, density):
        return select_block_lists(q, k, block_size=BLOCK_SIZE, density=density,
                                  forced=self.forced)  # [B, H, Qb], [B, H, Qb, W]

    def attend(self, q, k, v, block_map, kernel_options=None, backend=None):
        if kernel_options is not None:
            return flex_block_sparse_attention(q, k, v, block_map, block_size=BLOCK_SIZE,
                                               kernel_options=kernel_options)
        return block_sparse_attention(q, k, v, block_map, block_size=BLOCK_SIZE,
                                      backend=backend or self.work.backend)

    def runtime(self, qp, kp, vp, density, backend=None):
        """Selection + kernel on tokens already in tile order (as the runtime runs a layer)."""
        return select_and_attend(qp, kp, vp, block_size=BLOCK_SIZE, density=density,
                                 forced=self.forced, backend=backend or self.work.backend)[0]

    def __call__(self, q, k, v, density, select_fn=select_blocks, backend=None):
        q, k, v = self.permute(q, k, v)
        if select_fn is select_blocks:
            out = self.runtime(q, k, v, density, backend)
        else:
            out = self.attend(q, k, v, self.select(q, k, density, select_fn), backend=backend)
        return out.index_select(2, self.inverse)


def make_inputs(work: Workload, seq_len: int | None = None, heads: int | None = None):
    shape = (1, heads or work.heads, seq_len or work.seq_len, work.head_dim)
    return [torch.randn(shape, dtype=work.dtype, device=work.device) for _ in range(3)]


def timing_cases(work: Workload, q, k, v, backends: list[str],
                 core: bool = False) -> list[tuple[str, Callable[[], object], float]]:
    """(name, fn, computed density) for every timed case; density 1.0 for dense ops."""
    op = SparseOp(work, (1, 8, 8))
    qp, kp, vp = op.permute(q, k, v)
    cases = [("dense SDPA", lambda: F.scaled_dot_product_attention(q, k, v), 1.0)]
    maps = {d: op.select(qp, kp, d) for d in DENSITIES}
    lists = {d: lists_from_map(m) for d, m in maps.items()}
    computed = {d: m.float().mean().item() for d, m in maps.items()}
    for backend in backends:
        for density in DENSITIES:
            cases += [
                (f"runtime op d={density} {backend}",
                 lambda d=density, b=backend: op.runtime(qp, kp, vp, d, b), computed[density]),
                (f"kernel alone d={density} {backend}",
                 lambda m=maps[density], b=backend: op.attend(qp, kp, vp, m, backend=b),
                 computed[density]),
            ]
            if backend == "fa4":
                cases += [
                    (f"kernel on given lists d={density} fa4",
                     lambda c=lists[density]: fa4_attention_from_lists(qp, kp, vp, *c),
                     computed[density]),
                    (f"selection alone d={density} fa4 (lists from top-k)",
                     lambda d=density: op.select_lists(qp, kp, d), computed[density]),
                ]
            else:
                cases.append((f"selection alone d={density} {backend}",
                              lambda d=density: op.select(qp, kp, d), computed[density]))
        cases.append((f"full op d=0.2, per-call permutation {backend}",
                      lambda b=backend: op(q, k, v, 0.2, backend=b), computed[0.2]))
    hidden = torch.randn(1, work.seq_len, MODEL_WIDTH, dtype=work.dtype, device=work.device)
    cases.append(("permutation per forward (hidden in + out)",
                  lambda: hidden.index_select(1, op.perm).index_select(1, op.inverse), 1.0))
    if core:
        return cases
    cases.append(("full op d=0.2, reference selection",
                  lambda: op(q, k, v, 0.2, select_blocks_reference), computed[0.2]))
    if work.device.type == "cuda":  # the Triton selection kernels against their PyTorch twins
        cases += [
            ("runtime op d=0.2, PyTorch selection (twins)",
             lambda: _with_torch_selection(op.runtime, qp, kp, vp, 0.2), computed[0.2]),
            ("selection alone d=0.2, PyTorch (twins)",
             lambda: _with_torch_selection(op.select, qp, kp, 0.2), computed[0.2]),
        ]
    no_sink = SparseOp(work, (1, 8, 8), sink=False)
    cases.append(("runtime op d=0.2, no sink", lambda: no_sink.runtime(qp, kp, vp, 0.2),
                  no_sink.select(qp, kp, 0.2).float().mean().item()))
    if work.backend == "flex":
        for options in KERNEL_OPTIONS[1:]:
            cases.append((f"kernel d=0.2 {_options_label(options)}",
                          lambda o=options: op.attend(qp, kp, vp, maps[0.2], o), computed[0.2]))
    return cases


def _with_torch_selection(fn, *args):
    """fn(*args) with the selection and BlockMask lists built by the PyTorch twins."""
    previous, registry.USE_TRITON_SELECTION = registry.USE_TRITON_SELECTION, False
    try:
        return fn(*args)
    finally:
        registry.USE_TRITON_SELECTION = previous  # DITPLAN_TRITON_SELECTION=0 stays off


def _options_label(options: dict) -> str:
    return " ".join(f"{key}={value}" for key, value in options.items())


def correctness(work: Workload, q, k, v, backend: str) -> dict[str, float]:
    """Relative errors: kernel at density 1.0 vs dense SDPA (full shape); kernel vs the masked
    float64 reference on a smaller sequence with a partial tail block."""
    ones = torch.ones(1, 1, *(2 * [-(-work.seq_len // BLOCK_SIZE)]), dtype=torch.bool,
                      device=work.device)
    dense = F.scaled_dot_product_attention(q, k, v).float()
    sparse = block_sparse_attention(q, k, v, ones, backend=backend).float()
    small_seq = min(work.seq_len, 4000) - 37  # not a multiple of the block size
    qs, ks, vs = make_inputs(work, seq_len=small_seq, heads=2)
    block_map = select_blocks(qs, ks, block_size=BLOCK_SIZE, density=0.2)
    out = block_sparse_attention(qs, ks, vs, block_map, backend=backend).double()
    ref = masked_attention_reference(qs.double(), ks.double(), vs.double(), block_map,
                                     block_size=BLOCK_SIZE)
    return {f"{backend} density1_vs_sdpa_rel_err": ((sparse - dense).norm() / dense.norm()).item(),
            f"{backend} vs_masked_reference_S{small_seq}_rel_err":
                ((out - ref).norm() / ref.norm()).item()}


def run(work: Workload, backends: list[str], core: bool = False) -> dict:
    torch.manual_seed(0)
    q, k, v = make_inputs(work)
    specs = {b: registry.backend_spec(b) for b in backends}
    unavailable = {b: s.reason(work.device) for b, s in specs.items()
                   if not s.is_available(work.device)}
    backends = [b for b in backends if b not in unavailable]  # never time a fallback as b
    results = {"unavailable": unavailable, "torch": torch.__version__,
               "device": _device_name(work.device),
               "shape": [1, work.heads, work.seq_len, work.head_dim], "grid": list(work.grid),
               "dtype": str(work.dtype), "backends": backends, "block_size": BLOCK_SIZE,
               "versions": _versions(), "correctness": {}, "cases": []}
    for backend in backends:
        results["correctness"].update(correctness(work, q, k, v, backend))
    for name, fn, achieved in timing_cases(work, q, k, v, backends, core):
        try:
            ms, memory = median_ms(fn, work.device), peak_mib(fn, work.device)
        except Exception as exc:  # a kernel-option setting the card can't run: say so, go on
            results["cases"].append({"name": name, "error": f"{type(exc).__name__}: {exc}"[:200]})
            continue
        results["cases"].append({"name": name, "ms": ms, "density": achieved,
                                 "memory_mib": memory})
    timed = {c["name"]: c for c in results["cases"] if "ms" in c}
    per_forward = timed["permutation per forward (hidden in + out)"]["ms"]
    for backend in backends:
        for density in DENSITIES:
            case = timed.get(f"runtime op d={density} {backend}")
            if case is None:  # it failed; its error row says why
                continue
            results["cases"].append({
                "name": f"runtime op d={density} {backend} + 1/{LAYERS} of the permutation (sum)",
                "ms": case["ms"] + per_forward / LAYERS, "density": case["density"],
                "memory_mib": case["memory_mib"]})
    dense_ms = results["cases"][0]["ms"]
    for case in results["cases"]:
        if "ms" in case:
            case["speedup_vs_dense"] = dense_ms / case["ms"]
    return results


def _versions() -> dict[str, str]:
    """Versions of the packages the kernels come from (absent ones left out)."""
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in ("triton", "flash-attn-4", "nvidia-cutlass-dsl"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            continue
    return found


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def format_report(results: dict) -> str:
    versions = ", ".join(f"{k} {v}" for k, v in results["versions"].items())
    lines = [f"torch {results['torch']} ({versions}) on {results['device']}; shape "
             f"{results['shape']} (grid {results['grid']}), {results['dtype']}, backends "
             f"{', '.join(results['backends'])}, block {results['block_size']}"]
    lines += [f"  not timed, {name}: {why}" for name, why in results["unavailable"].items()]
    lines += [f"  {name}: {value:.2e}" for name, value in results["correctness"].items()]
    lines.append(f"{'case':<64} {'ms':>9} {'vs dense':>9} {'density':>8} {'extra MiB':>10}")
    for case in results["cases"]:
        if "error" in case:
            lines.append(f"{case['name']:<64} failed: {case['error']}")
            continue
        extra = case["memory_mib"]["extra"]
        extra = "-" if extra is None else f"{extra:.0f}"
        lines.append(f"{case['name']:<64} {case['ms']:>9.3f} {case['speedup_vs_dense']:>8.2f}x "
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
    parser.add_argument("--backends", nargs="+", help="backends to time (default: flex on "
                        "CUDA, torch with --quick), e.g. flex fa4")
    parser.add_argument("--core", action="store_true", help="only dense, the runtime op, "
                        "kernel and selection per backend, and the permutations")
    args = parser.parse_args(argv)
    if args.quick:
        work = Workload(**QUICK, device=torch.device("cpu"), backend="torch")
    elif not torch.cuda.is_available():
        parser.error("the full benchmark needs a CUDA GPU; use --quick on CPU")
    else:
        work = Workload(**FULL, device=torch.device("cuda"), backend="flex")
    results = run(work, args.backends or [work.backend], args.core)
    print(format_report(results))
    if args.json:
        write_json(args.json, results)


if __name__ == "__main__":
    main()
