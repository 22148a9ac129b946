"""ditplan plans for the benchmark: profile once into a cache folder, compile presets, speed
budgets, ablations and ProfilingDiT as published, and apply them as methods."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from benchmarks.quality.methods import Installed, Method, NotApplicable, transformer_of
from benchmarks.quality.workload import Workload
from ditplan.policy.compiler import compile_policy
from ditplan.policy.config import CompilerConfig, CompilerError
from ditplan.policy.experts import execution_dict
from ditplan.policy.load_profile import load_profile
from ditplan.policy.plan import Plan, PlanError
from ditplan.policy.plan_io import load_plan, save_plan
from ditplan.runtime.apply import apply_plan

logger = logging.getLogger(__name__)

# ProfilingDiT's released Wan2.1 settings: warm-up 6 of 50 steps (12%), then a fixed refresh
# interval; the R_attn threshold tau is not published, so the split is at the median.
PROFILINGDIT_WARMUP_FRACTION = 0.12
_NEVER = 1e9  # a factor no change curve reaches: disables late-step and per-branch schedules


def profile_traces(pipe, workload: Workload, cache_dir: Path, device: str,
                   **settings) -> Path:
    """Profile ``pipe`` at ``workload`` into ``cache_dir/<workload key>`` (resumes a finished part).

    Profiling uses the profiler's default training-distribution captions, not the held-out
    captions the benchmark scores. ``settings``: further ProfileConfig fields (e.g. mode,
    attention_steps).

    Returns:
        the trace folder.
    """
    from ditplan.profiler.config import ProfileConfig
    from ditplan.profiler.run import profile_pipeline

    out = cache_dir / workload.key()
    config = ProfileConfig(
        out=out, steps=workload.steps, frames=workload.frames, height=workload.height,
        width=workload.width, guidance_scale=workload.guidance_scale, device=device,
        dtype=str(pipe.transformer.dtype).removeprefix("torch."), block_size=workload.block_size,
        tile=workload.tile, progress=False, **settings)
    logger.info("profiling into %s", out)
    profile_pipeline(config, pipe=pipe)
    return out


def r_attn_roles(trace_dir: Path) -> dict[str, str]:
    """ProfilingDiT's fixed split: blocks with R_attn >= the median are foreground."""
    profile = load_profile(trace_dir)
    r_attn = profile.features["r_attn"]  # [L]
    tau = float(np.median(r_attn))
    return {block: "foreground" if value >= tau else "background"
            for block, value in zip(profile.blocks, r_attn, strict=True)}


def profilingdit_overrides(roles: dict[str, str], interval: int) -> dict:
    """Compiler overrides that reproduce ProfilingDiT: given roles, fixed interval, no sparsity."""
    return dict(roles=roles, fixed_density=1.0, t_max=interval, t_min=interval,
                warmup_min_fraction=PROFILINGDIT_WARMUP_FRACTION,
                warmup_max_fraction=PROFILINGDIT_WARMUP_FRACTION,
                late_rise_factor=_NEVER, cfg_divergence=_NEVER)


def plan_method(family: str, setting: str, trace_dir: Callable[[], Path], preset: str, *,
                backend: str, overrides: Callable[[], dict] = dict,
                adapt: Callable[[Plan, object], Plan] | None = None, params: dict | None = None,
                notes: str = "") -> Method:
    """A plan compiled from the traces with ``CompilerConfig.from_name(preset, **overrides())``.

    ``adapt(plan, transformer)`` maps the plan onto another model (the speed-at-scale run).
    """

    def install(pipe) -> Installed:
        try:
            plan = compile_policy(trace_dir(), CompilerConfig.from_name(preset, **overrides()))
        except CompilerError as error:
            raise NotApplicable(str(error)) from error
        if _is_dense(plan):
            raise NotApplicable("the compiled plan keeps every layer dense and caches nothing "
                                "at this workload (the traces support no sparsity here)")
        if adapt is not None:
            plan = adapt(plan, transformer_of(pipe))
        handle = apply_plan(pipe, plan, backend=backend)
        predicted = {"predicted_speedup": plan.provenance.predicted_speedup,
                     "estimated_heads": estimated_head_count(plan)}
        return Installed(undo=handle.remove, stats=lambda: {**handle.stats(), **predicted},
                         reset=handle.reset, plan_key=plan_key(plan))

    return Method(family, setting, install, {"preset": preset, **(params or {})}, notes)


PLAN_FILE_FAMILY = "plan-file"


def plan_file_method(path: Path, plan: Plan, backend: str) -> Method:
    """``plan``, read from ``path`` (a saved or shared plan), run as it is: setting = the file's
    stem. A plan for another model or workload is recorded as not applicable."""

    def install(pipe) -> Installed:
        try:
            handle = apply_plan(pipe, plan, backend=backend)
        except PlanError as error:
            raise NotApplicable(str(error)) from error
        recorded = {"predicted_speedup": plan.provenance.predicted_speedup,
                    "design": plan.provenance.compiler_settings.get("design", ""),
                    "estimated_heads": estimated_head_count(plan)}
        return Installed(undo=handle.remove, stats=lambda: {**handle.stats(), **recorded},
                         reset=handle.reset, plan_key=plan_key(plan))

    return Method(PLAN_FILE_FAMILY, path.stem, install, {"plan_file": str(path)},
                  "a saved plan run as it is")


def plan_file_methods(paths: Sequence[Path], backend: str) -> list[Method]:
    """One method per plan file, each read and checked now (PlanError names a bad file before
    any model loads); two files with one stem would share a row name and are refused."""
    stems = [p.stem for p in paths]
    twice = sorted({s for s in stems if stems.count(s) > 1})
    if twice:
        raise PlanError(f"plan files share a name ({', '.join(twice)}): their rows would be one "
                        "row; rename them")
    return [plan_file_method(p, load_plan(p), backend) for p in paths]


def estimated_head_count(plan: Plan) -> int:
    """How many (layer, head) pairs of ``plan`` estimate their dropped key blocks."""
    return sum(sum(layer.attention.estimate_heads or ()) for layer in plan.layers.values())


def plan_key(plan: Plan) -> str:
    """A digest of what ``plan`` runs (everything but its provenance: two compiler settings that
    give the same plan give the same key)."""
    text = json.dumps(execution_dict(plan), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def calibrated_method(target: float, trace_dir: Callable[[], Path], *, calibrator: Callable,
                      plans_dir: Path, backend: str, candidates: int,
                      refine: tuple[int, int] = (0, 1),
                      adapt: Callable[[Plan, object], Plan] | None = None,
                      family: str = "ditplan-calibrated", forced: dict | None = None) -> Method:
    """``compile-policy --target-speedup T --calibrate`` as a user runs it: the best measured of
    ``candidates`` plans on calibration prompts (training captions, never the evaluation ones),
    then ``refine`` = (rounds, neighbours per round) of ``--refine``; ``forced``: further
    compiler settings (e.g. ``fixed_density=1.0``: caching only).

    ``calibrator(pipe)`` gives the Calibrator. The chosen plan is saved in ``plans_dir``; the
    speed-at-scale run (``adapt``) maps that saved plan, since random weights measure nothing.
    """
    forced = dict(forced or {})
    saved = plans_dir / f"{family.removeprefix('ditplan-')}-{target:g}x.json"

    def install(pipe) -> Installed:
        if adapt is not None:
            if not saved.is_file():
                raise NotApplicable(f"{saved} is missing: run the quality part first")
            plan = adapt(load_plan(saved), transformer_of(pipe))
        else:
            config = CompilerConfig.from_name("balanced", target_speedup=target,
                                              calibrate_candidates=candidates,
                                              refine_rounds=refine[0], refine_candidates=refine[1],
                                              **forced)
            try:
                plan = compile_policy(trace_dir(), config, calibrate=calibrator(pipe))
            except CompilerError as error:
                raise NotApplicable(str(error)) from error
            save_plan(plan, saved)
        handle = apply_plan(pipe, plan, backend=backend)
        prov = plan.provenance
        recorded = {"predicted_speedup": prov.predicted_speedup, "design":
                    prov.compiler_settings.get("design", "")}
        if prov.calibration is not None:
            recorded.update(calibrated_speedup=prov.calibration.speedup,
                            calibrated_psnr_db=prov.calibration.psnr_db)
        return Installed(undo=handle.remove, stats=lambda: {**handle.stats(), **recorded},
                         reset=handle.reset)

    return Method(family, f"target={target:g}x", install,
                  {"target_speedup": target, "candidates": candidates, "refine_rounds": refine[0],
                   **forced},
                  "compile-policy --calibrate on training captions (disjoint from evaluation)")


def _is_dense(plan: Plan) -> bool:
    """True when applying the plan changes nothing: every layer dense, no cache groups."""
    dense = all(spec.is_dense for spec in plan.attention_specs().values())
    return dense and not plan.runs
