"""End to end at scale: a plan (sparse attention + background caching) on the Wan2.1-1.3B-shaped
transformer (random weights, 480p x 81 frames), N denoising steps with CFG, vs dense in one run.

    python -m benchmarks.end_to_end --out DIR [--steps 50] [--density 0.2] [--step-target 3]
        [--json out.json]
    python -m benchmarks.end_to_end --out DIR --quick        # CPU smoke run, tiny model

Random weights give no meaningful roles or densities, so the plan is made like this:
1. profile the model over the N-step schedule (Euler + CFG on fixed random latents and text,
   transformer calls only), attention statistics at the first, middle and last step, step change
   at every step -> DIR/trace;
2. compile it with roles and density set by flags: every layer at --density (share of block
   pairs computed, sink included), every block background except --foreground, caching on; the
   compiler derives dense warm-up and the cache schedule from the trace's change curves. A
   sparse-only plan (same flags, no caching) separates the two effects, and a third plan asks
   the compiler for --step-target X with the same density: its search combines step-level
   block runs (whole-stack or all-but-first reuse/forecast schedules) with sparse attention on
   the steps that compute;
3. time dense and each plan (eager, after a flex warm-up), report per-step and total time,
   speedup, achieved density, share of block evaluations skipped, and peak memory.

--compile: every variant compiled block by block instead (inductor; dynamo's eager backend on
CPU): dense with ``compile_blocks`` and each plan with ``apply_plan(..., compile=...)``, as
``ditplan run --compile`` does (each block's own forward, beneath the cache hooks with a plan;
sessions 14-15 compiled dense with diffusers' ``compile_repeated_blocks``, the same graph per
block); generations run untimed until
one compiles no new graph, then one is timed (the rows say how many and how long that took).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from benchmarks.common import (
    banner,
    compile_until_settled,
    graphs_compiled_by,
    timed_once,
)
from benchmarks.forward import build
from benchmarks.quality.scale import Denoiser
from ditplan.policy.compiler import compile_policy
from ditplan.policy.config import CompilerConfig
from ditplan.policy.plan import Plan
from ditplan.policy.plan_io import save_plan
from ditplan.profiler.config import RecorderSettings
from ditplan.profiler.recorders import ProfileRecorder
from ditplan.profiler.schema import ModelConfig, ModelFingerprint, TraceMetadata, Workload
from ditplan.profiler.writer import build_tables, library_versions, unit_name, write_unit
from ditplan.runtime.adapters.base import get_adapter
from ditplan.runtime.apply import apply_plan, compile_blocks
from ditplan.runtime.fingerprint import model_fingerprint
from ditplan.runtime.kernels import block_sparse_attention

FULL_PIXELS = dict(height=480, width=832, frames=81)  # WAN_480P_LATENTS in pixels (VAE 8x, 4x)
QUICK_PIXELS = dict(height=128, width=256, frames=9)  # benchmarks.forward's quick latents


def profile_schedule(model, inputs: dict, steps: int, out: Path, pixels: dict) -> Path:
    """Profile the Denoiser's N steps into ``out`` (one trace unit); returns ``out``."""
    attention_steps = sorted({0, steps // 2, steps - 1})
    settings = RecorderSettings(map_steps=(), attention_steps=attention_steps)
    denoise = Denoiser(model, inputs, steps)
    with ProfileRecorder(model, settings, steps) as recorder:
        denoise()
        rows = recorder.take_rows()
    adapter = get_adapter(model)
    meta = settings.to_metadata()
    meta.update(mode="benchmark", foreground="none", dtype=str(model.dtype))
    metadata = TraceMetadata(
        run_id="end-to-end", fingerprint=ModelFingerprint(**model_fingerprint(model)),
        model_config=ModelConfig(**adapter.model_config(model, recorder.text_len)),
        workload=Workload(steps=steps, guidance_scale=5.0, cfg=True,
                          tokens_grid=recorder.layout.grid, **pixels),
        profiler_settings=meta, library_versions=library_versions())
    tables = build_tables(rows, run_id="end-to-end", prompt_index=0, seed=0)
    write_unit(out, unit_name(0, 0), tables, metadata)
    return out


def plans_from_flags(trace: Path, blocks: int, density: float, foreground: list[int],
                     step_target: float) -> dict[str, Plan]:
    """The flag-made plans: sparse + caching, sparse only, and sparse + searched step runs."""
    roles = {f"blocks.{i}": "foreground" for i in foreground if i < blocks}
    common = dict(all_roles="background", roles=roles, fixed_density=density)
    return {
        f"plan d={density} + caching": compile_policy(
            trace, CompilerConfig.from_name("fast", **common)),
        f"plan d={density}, sparse only": compile_policy(
            trace, CompilerConfig.from_name("fast", caching=False, **common)),
        f"plan d={density} + step runs {step_target:g}x": compile_policy(
            trace, CompilerConfig.from_name("fast", target_speedup=step_target, **common)),
    }


def warm_up_flex(model, inputs: dict, device: str, dtype) -> None:
    """One kernel call at the model's attention shape, so flex compiles outside the timings."""
    config = model.config
    tokens = get_adapter(model).token_layout(model, (), inputs).video_tokens
    shape = (1, config.num_attention_heads, tokens, config.attention_head_dim)
    q, k, v = (torch.randn(shape, device=device, dtype=dtype) for _ in range(3))
    blocks = -(-tokens // 128)
    block_map = torch.rand(1, 1, blocks, blocks, device=device) < 0.2
    with torch.no_grad():
        block_sparse_attention(q, k, v, block_map, block_size=128)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True, help="trace and plans go here")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--density", type=float, default=0.2)
    p.add_argument("--foreground", type=int, nargs="*", default=[0, 29],
                   help="block indices kept foreground (always computed)")
    p.add_argument("--step-target", type=float, default=3.0, metavar="X",
                   help="predicted speedup the searched step-run plan must reach")
    p.add_argument("--compile", action="store_true",
                   help="time every variant compiled block by block (warm-up generations first)")
    p.add_argument("--quick", action="store_true", help="tiny model on CPU (smoke run)")
    p.add_argument("--json", type=Path, help="also write the rows here")
    args = p.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() and not args.quick else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    print(banner(), flush=True)
    model, inputs = build(args.quick, device, dtype)
    pixels = QUICK_PIXELS if args.quick else FULL_PIXELS
    start = time.perf_counter()
    trace = profile_schedule(model, inputs, args.steps, args.out / "trace", pixels)
    print(f"profiled {args.steps} steps in {time.perf_counter() - start:.0f} s", flush=True)
    plans = plans_from_flags(trace, len(model.blocks), args.density, args.foreground,
                             args.step_target)
    for name, plan in plans.items():
        save_plan(plan, args.out / f"{name.replace(' ', '_').replace('=', '')}.json")
    denoise = Denoiser(model, inputs, args.steps)
    compiling = {"backend": "inductor" if device == "cuda" else "eager"} if args.compile else None
    compiled = None
    if compiling is not None:
        torch._dynamo.reset()
        compiled = compile_blocks(model, compiling)
    warm = _warm_up(denoise, compiling)
    rows = [dict(variant="dense", **_row(*timed_once(denoise, device), args.steps), **warm)]
    if compiled is not None:
        compiled.remove()
    print(f"dense: {rows[0]['seconds']:.1f} s", flush=True)
    warm_up_flex(model, inputs, device, dtype)
    for name, plan in plans.items():
        torch._dynamo.reset()
        handle = apply_plan(model, plan, check_weights=False, compile=compiling or False)
        warm = _warm_up(denoise, compiling)
        handle.reset()  # the statistics of the timed generation only
        seconds, peak = timed_once(denoise, device)
        rows.append(dict(variant=name, **_row(seconds, peak, args.steps), **handle.stats(),
                         dense_steps=_dense_steps(plan), **warm))
        print(f"{name}: {seconds:.1f} s", flush=True)
        handle.remove()
    report(rows, args)
    result = dict(banner=banner(), steps=args.steps, rows=rows)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return result


def _warm_up(denoise, compiling: dict | None) -> dict:
    """Compiled: generate until nothing new compiles; the row's warm-up columns."""
    if compiling is None:
        return {}
    start = time.perf_counter()
    compiling, graphs = compile_until_settled(lambda: graphs_compiled_by(denoise), 3,
                                              "generations")
    generations, seconds = compiling + 1, time.perf_counter() - start  # with the settled one
    print(f"  compiled {graphs} graphs in {generations} generation(s), {seconds:.0f} s",
          flush=True)
    return dict(warm_up_generations=generations, warm_up_s=seconds, graphs=graphs)


def _row(seconds: float, peak: float, steps: int) -> dict:
    return dict(seconds=seconds, ms_per_step=1000 * seconds / steps, peak_gib=peak)


def _dense_steps(plan: Plan) -> int:
    """Dense warm-up steps of the plan's first sparse layer (the flags give all the same)."""
    specs = [s for s in plan.attention_specs().values() if not s.is_dense]
    return len(specs[0].dense_steps) if specs else plan.workload.steps


def report(rows: list[dict], args) -> None:
    dense = rows[0]["seconds"]
    print(f"\n{args.steps} steps with CFG; density {args.density}; foreground blocks "
          f"{args.foreground}")
    print(f"{'variant':<32} {'total s':>8} {'ms/step':>8} {'speedup':>8} {'density':>8} "
          f"{'skipped':>8} {'warm-up':>8} {'peak GiB':>9}")
    for r in rows:
        print(f"{r['variant']:<32} {r['seconds']:8.1f} {r['ms_per_step']:8.0f} "
              f"{dense / r['seconds']:7.2f}x {r.get('attention_density', 1.0):8.3f} "
              f"{r.get('blocks_skipped_share', 0.0):8.1%} {r.get('dense_steps', '-'):>8} "
              f"{r['peak_gib']:9.2f}"
              + (f"  compiled: {r['graphs']} graphs, {r['warm_up_generations']} warm-up "
                 f"generations, {r['warm_up_s']:.0f} s" if "graphs" in r else ""))


if __name__ == "__main__":
    main()
