"""Context parallelism at the Wan2.1-1.3B shape (random weights, 480p x 81 frames): dense and
sparse attention, one GPU against W GPUs (diffusers' Ulysses), in one torchrun.

    torchrun --nproc-per-node 2 -m benchmarks.parallel [--density 0.2] [--steps N]
        [--repeats 5] [--chunks 1 2 ...] [--profile DIR] [--json out.json]
    --quick: the tiny model (4 heads) on CPU over gloo (a smoke run; the test suite runs it in
    2 ranks)

Every rank first times the model alone on its own GPU (the 1-GPU rows; the ranks run them
side by side, each on its own card). Then ditplan installs sparse attention (every layer at
--density) with parallel=ContextParallelConfig(ulysses_degree=W) and the ranks time it
together, once per --chunks count (ulysses_chunks: 1 is diffusers' all-to-alls, C > 1 the
pipelined head chunks; the later counts are set on the installed layers); remove() leaves
diffusers' plain context parallelism, timed as dense on W GPUs (a parallel model takes no
second installation, so the sparse rows come first). Each time is one transformer forward
(median of --repeats after 2 warm-ups, the slowest rank's); --steps N also times one N-step
CFG denoising loop per variant (warm from the forwards). The W-GPU outputs are
compared with the 1-GPU ones of the same variant (bf16: equal within rounding, not bitwise).
--profile DIR: after each row's timing one more forward runs under torch.profiler and rank 0
writes its self time by kind (communication, attention, matmul, copy, other) and its top ops to
DIR/profile-<row>.txt: where the W-GPU rows spend the time a perfect split would not.
--compile [model|blocks]: every row times the model compiled (inductor; dynamo's eager backend
on CPU), compiled anew for the row and called on every rank until no rank compiles a new graph;
the rows then say how long that took. ``model`` (the default) is ``torch.compile(model)``;
``blocks`` compiles each transformer block (``compile_blocks``, as ``ditplan run --compile``;
sessions 14-15 used diffusers' ``compile_repeated_blocks``, the same graph per block): the blocks
share their graphs, much quicker to compile. Not with
--steps (the loop runs the model eagerly).
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import time

import torch
import torch.distributed as dist
from diffusers import ContextParallelConfig, WanTransformer3DModel

from benchmarks.common import (
    banner,
    compile_until_settled,
    peak_memory_gib,
    time_ms,
)
from benchmarks.forward import QUICK_CONFIG, build, call_counting_graphs
from benchmarks.forward_profile import profile_call, write_profile
from benchmarks.quality.scale import Denoiser
from ditplan.policy.plan import AttentionSpec
from ditplan.runtime.adapters.base import get_adapter
from ditplan.runtime.apply import apply_sparse_attention, compile_blocks
from ditplan.runtime.parallel import check_chunks, check_parallel_config, mean_over_ranks

# benchmarks.forward's quick model with 4 heads (2 a rank on 2 ranks), so --chunks 2 runs
QUICK_HEADS = dict(QUICK_CONFIG, num_attention_heads=4, attention_head_dim=16)


def setup() -> torch.device:
    """Join the launch's process group (NCCL on GPUs, gloo on CPU); this rank's device."""
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    if not hasattr(logging.Logger, "warning_once"):
        # diffusers 0.42's CP hooks log through Logger.warning_once, which only transformers
        # defines; a bare transformer run without it would fail at the first forward.
        try:
            import transformers  # noqa: F401
        except ImportError:
            logging.Logger.warning_once = functools.lru_cache(None)(logging.Logger.warning)
    return torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")


def shared_model(quick: bool, device: torch.device):
    """The model and inputs of benchmarks.forward, rank 0's weights and inputs on every rank."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    model, inputs = build(quick, device.type, dtype)
    if quick:
        model = WanTransformer3DModel(**QUICK_HEADS).eval()
    for tensor in [*model.parameters(), *model.buffers(),
                   *(x for x in inputs.values() if torch.is_tensor(x))]:
        dist.broadcast(tensor.data, src=0)
    return model, inputs


class Timer:
    """Times the model as it is now: a forward, and with ``steps`` a denoising loop; with
    ``compile_backend`` the forward compiled by it, the whole model or (``compile_scope``
    "blocks") each transformer block."""

    def __init__(self, model, inputs: dict, steps: int, repeats: int, profile_dir=None,
                 compile_backend: str | None = None, compile_scope: str = "model"):
        self.model, self.inputs, self.repeats = model, inputs, repeats
        self.runner = model  # what forward() calls: the model, or the row's compiled model
        self.profile_dir, self.compile_backend = profile_dir, compile_backend
        self.compile_scope = compile_scope
        self.compiled = None  # the row's compile_blocks, while the row runs
        self.denoise = Denoiser(model, inputs, steps) if steps else None
        if self.denoise is not None:
            dist.broadcast(self.denoise.text["uncond"], src=0)  # drawn on each rank

    def forward(self) -> torch.Tensor:
        with torch.no_grad():
            return self.runner(**self.inputs)[0]  # [1, C, F, H, W]

    def compile(self, max_calls: int = 6) -> dict:
        """Compile the model as installed now and call it until no rank compiles a new graph
        (every rank makes the same calls: the collectives inside must pair up)."""
        torch._dynamo.reset()
        if self.compile_scope == "blocks":
            self.compiled = compile_blocks(self.model, {"backend": self.compile_backend})
        else:
            self.runner = torch.compile(self.model, backend=self.compile_backend)
        device = self.inputs["hidden_states"].device.type
        start = time.perf_counter()
        # graphs: how many frames were compiled (graph breaks add frames), the most of any rank
        calls, graphs = compile_until_settled(
            lambda: int(_over_ranks(call_counting_graphs(self.runner, self.inputs, device),
                                    dist.ReduceOp.MAX)), max_calls)
        return dict(compile_s=_over_ranks(time.perf_counter() - start, dist.ReduceOp.MAX),
                    compiling_calls=calls, graphs=graphs)

    def measure(self, variant: str, gpus: int, layers=(), **extra) -> dict:
        """The row of the model as installed now; ``layers``: its sparse layers' runtimes;
        ``extra``: more columns of the row."""
        if self.compile_backend is not None:
            extra = {**extra, **self.compile()}
        dist.barrier()
        ms = _over_ranks(time_ms(self.forward, repeats=self.repeats), dist.ReduceOp.MAX)
        row = dict(variant=variant, gpus=gpus, ms=ms, peak_gib=peak_memory_gib(self.forward),
                   out=self.forward().float().cpu(), **extra)
        if self.denoise is not None:  # warm already: one timed loop
            dist.barrier()
            start = time.perf_counter()
            out = self.denoise()  # [1, C, F, H, W]
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            row.update(loop_s=_over_ranks(time.perf_counter() - start, dist.ReduceOp.MAX),
                       loop_out=out.float().cpu())
        if self.profile_dir is not None:  # after the timing: the profiler's cost stays out
            dist.barrier()
            report = profile_call(self.forward, self.inputs["hidden_states"].device)
            if dist.get_rank() == 0:
                chunks = f"-chunks{extra['chunks']}" if "chunks" in extra else ""
                write_profile(self.profile_dir, f"{variant}-{gpus}gpu{chunks}", report)
        densities = [d for d in (layer.achieved_density() for layer in layers) if d is not None]
        if densities:  # each rank selects for its own heads
            row["density"] = mean_over_ranks([sum(densities) / len(densities)], None)[0]
        self.runner = self.model
        if self.compiled is not None:
            self.compiled.remove()
            self.compiled = None
        if dist.get_rank() == 0:  # progress: a compiled row can take minutes
            print(f"measured {variant} on {gpus} GPU(s): {ms:.1f} ms"
                  + (f" (compiled: {extra['graphs']} graphs, {extra['compile_s']:.0f} s)"
                     if "compile_s" in extra else ""), flush=True)
        return row


def _over_ranks(value: float, op) -> float:
    tensor = torch.tensor([value], dtype=torch.float64,
                          device="cuda" if torch.cuda.is_available() else "cpu")
    dist.all_reduce(tensor, op=op)
    return float(tensor)


def run(args) -> list[dict]:
    """All rows, in the order measured (every rank returns them)."""
    device = setup()
    world = dist.get_world_size()
    model, inputs = shared_model(args.quick, device)
    parallel = ContextParallelConfig(ulysses_degree=world)
    for chunks in args.chunks:  # refused before anything is timed
        check_chunks(chunks, parallel)
        check_parallel_config(parallel, model, get_adapter(model), chunks)
    compile_backend = "inductor" if device.type == "cuda" else "eager"
    timer = Timer(model, inputs, args.steps, args.repeats, args.profile,
                  compile_backend if args.compile else None, args.compile or "model")
    spec = AttentionSpec(density=args.density)
    sparse = f"sparse d={args.density:g}"
    rows = [timer.measure("dense", 1)]
    handle = apply_sparse_attention(model, spec, backend=args.backend)
    rows.append(timer.measure(sparse, 1, handle.layers))
    handle.remove()
    handle = apply_sparse_attention(model, spec, backend=args.backend, parallel=parallel,
                                    ulysses_chunks=args.chunks[0])
    for chunks in args.chunks:
        for layer in handle.layers:
            layer.ulysses_chunks = chunks
            layer.reset_stats()
        rows.append(timer.measure(sparse, world, handle.layers, chunks=chunks))
    handle.remove()  # plain context parallelism stays
    rows.append(timer.measure("dense", world))
    return rows


def report(rows: list[dict]) -> list[dict]:
    """Print the table; the rows with ratios and differences, without tensors."""
    single = {r["variant"]: r for r in rows if r["gpus"] == 1}
    dense = {r["gpus"]: r for r in rows if r["variant"] == "dense"}
    loops = "loop_s" in rows[0]
    print(f"\n{'variant':<16} {'GPUs':>4} {'chunks':>6} {'ms/forward':>11} {'vs dense':>9} "
          f"{'vs 1 GPU':>9} {'density':>8} {'peak GiB':>9} {'max|diff| vs 1 GPU':>19} "
          f"{'max|out|':>9}"
          + (f" {'loop s':>8} {'loop max|diff|':>15}" if loops else ""))
    table = []
    for r in rows:
        one = single[r["variant"]]
        diff = (r["out"] - one["out"]).abs().max().item()
        scale = one["out"].abs().max().item()  # the difference's yardstick (bf16: 2^-8 of it)
        row = {k: v for k, v in r.items() if k not in ("out", "loop_out")}
        row.update(vs_dense=dense[r["gpus"]]["ms"] / r["ms"], vs_one_gpu=one["ms"] / r["ms"],
                   max_abs_diff=diff, max_abs_out=scale)
        line = (f"{r['variant']:<16} {r['gpus']:>4} {r.get('chunks', ''):>6} {r['ms']:>11.1f} "
                f"{row['vs_dense']:>8.2f}x {row['vs_one_gpu']:>8.2f}x "
                f"{r.get('density', 1.0):>8.3f} {r['peak_gib']:>9.2f} {diff:>19.2e} "
                f"{scale:>9.3g}")
        if loops:
            row["loop_max_abs_diff"] = (r["loop_out"] - one["loop_out"]).abs().max().item()
            line += f" {r['loop_s']:>8.1f} {row['loop_max_abs_diff']:>15.2e}"
        if "compile_s" in r:
            line += (f"  compiled: {r['graphs']} graphs in {r['compiling_calls']} calls, "
                     f"{r['compile_s']:.0f} s")
        print(line, flush=True)
        table.append(row)
    return table


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--density", type=float, default=0.2, help="every layer's density")
    p.add_argument("--steps", type=int, default=0,
                   help="also time one N-step CFG denoising loop per variant")
    p.add_argument("--backend", default="auto")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--chunks", type=int, nargs="+", default=[1],
                   help="time the sparse W-GPU row with each ulysses_chunks count (1: "
                        "diffusers' all-to-alls; C > 1: C pipelined head chunks a rank)")
    p.add_argument("--profile", metavar="DIR",
                   help="also profile one forward per row; rank 0 writes DIR/profile-*.txt")
    p.add_argument("--compile", nargs="?", const="model", choices=["model", "blocks"],
                   help="time every row compiled instead of eager: the whole model "
                        "(torch.compile(model), the default) or each transformer block "
                        "(compile_blocks: quicker to compile)")
    p.add_argument("--quick", action="store_true", help="tiny model on CPU (smoke run)")
    p.add_argument("--json", help="rank 0 writes the rows here")
    args = p.parse_args(argv)
    if args.compile and args.steps:
        p.error("--compile times forwards only: leave out --steps")
    rows = run(args)
    if dist.get_rank() != 0:
        return []
    print(banner(), f"| {dist.get_world_size()} ranks", flush=True)
    table = report(rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(banner=banner(), rows=table), f, indent=1)
    return table


if __name__ == "__main__":
    main()
    dist.destroy_process_group()
