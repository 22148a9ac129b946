"""Test factories for policy tests: synthetic trace directories with known answers, sample plans."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ditplan.policy.plan import (
    AttentionSpec,
    BlockRun,
    Calibration,
    LayerPlan,
    ModelIdentity,
    Plan,
    PlanDefaults,
    Provenance,
    RoleClassification,
)
from ditplan.policy.plan import Workload as PlanWorkload
from ditplan.profiler.schema import (
    CONTEXTS,
    DENSITY_GRID,
    OUTPUT_LAYER,
    ModelConfig,
    ModelFingerprint,
    TraceMetadata,
    Workload,
    make_table,
    write_table,
)


@dataclass(frozen=True)
class LayerTruth:
    """What a synthetic layer does. ``mass_fraction``: share of key blocks holding 95% of the
    mass (per head if ``head_fractions``); ``prediction``: predicted/oracle recall;
    ``estimate_gain``: per head, the output error with dropped blocks estimated over the error
    without (the error without: ``error_scale`` x the mass the oracle mask drops)."""

    foreground: bool = True
    mass_fraction: float = 0.1
    head_fractions: tuple[float, ...] | None = None
    prediction: float = 0.98
    estimate_gain: tuple[float, ...] | None = None
    error_scale: float = 1.0


@dataclass(frozen=True)
class TraceSpec:
    layers: tuple[LayerTruth, ...]
    heads: int = 2
    steps: int = 12
    prompts: int = 2
    cfg: bool = True
    uncond_decay: float = 1.5  # decay rate of the uncond change curves (1.5: branches agree)
    late_rise: bool = True
    output_errors: bool = False  # write the attention_error table (trace schema 2.1)
    fingerprint: ModelFingerprint = field(
        default_factory=lambda: ModelFingerprint("WanTransformer3DModel", "cfg-abc123", None)
    )


def oracle_recall(density: float, fraction: float) -> float:
    """Recall of the true top blocks when ``fraction`` of the blocks hold 95% of the mass."""
    if density <= fraction:
        return 0.95 * density / fraction
    return 0.95 + 0.05 * (density - fraction) / (1.0 - fraction)


def change_curve(steps: int, late_rise: bool, decay: float = 1.5) -> np.ndarray:
    """Step-change curve [T]: early decay to a 0.1 plateau, rising in the last 2 steps."""
    s = np.arange(steps, dtype=np.float64)
    curve = 0.1 + 2.0 * np.exp(-decay * s)
    if late_rise:
        curve[-2:] = [0.3, 0.5]
    curve[0] = np.nan
    return curve


def metadata(spec: TraceSpec, run_id: str = "run0") -> TraceMetadata:
    blocks = tuple(f"blocks.{i}" for i in range(len(spec.layers)))
    model = ModelConfig(
        num_layers=len(blocks), num_heads=spec.heads, head_dim=64, ffn_dim=1024,
        patch_size=(1, 2, 2), text_len=32, cross_attention=True, joint_attention=False,
        blocks=blocks, self_attention={b: f"{b}.attn1" for b in blocks},
    )
    workload = Workload(steps=spec.steps, height=96, width=96, frames=9,
                        guidance_scale=5.0 if spec.cfg else 1.0, cfg=spec.cfg,
                        tokens_grid=(3, 24, 24))
    settings = {"block_size": 128, "tile": [1, 8, 8], "densities": list(DENSITY_GRID),
                "sink": True, "map_steps": [0]}
    return TraceMetadata(run_id=run_id, fingerprint=spec.fingerprint, model_config=model,
                         workload=workload, profiler_settings=settings,
                         library_versions={"pyarrow": "test"})


def _keys(spec: TraceSpec, prompt: int, run_id: str):
    contexts = CONTEXTS if spec.cfg else CONTEXTS[:1]
    for step in range(spec.steps):
        for cfg in contexts:
            yield {"run_id": run_id, "prompt_index": prompt, "seed": 100 + prompt,
                   "step": step, "cfg": cfg}


def _tables(spec: TraceSpec, prompt: int, run_id: str, rng: np.random.Generator):
    stats, recall, error, change = [], [], [], []
    for key in _keys(spec, prompt, run_id):
        for i, truth in enumerate(spec.layers):
            layer = f"blocks.{i}"
            for head in range(spec.heads):
                fg = truth.foreground
                stats.append({**key, "layer": layer, "head": head, "sink_mass": 0.1,
                              "text_mass": 0.0, "entropy": 0.5 + 0.01 * rng.random(),
                              "r_attn": (0.8 if fg else 0.25) + 0.05 * rng.random(),
                              "r_attn_threshold": 2.0,
                              "fg_bg_mass_ratio": (3.0 if fg else 0.6) * (1 + 0.1 * rng.random()),
                              "foreground_fraction": 0.3})
                fraction = (truth.head_fractions or [truth.mass_fraction] * spec.heads)[head]
                for d in DENSITY_GRID:
                    o = oracle_recall(d, fraction)
                    p = o * truth.prediction * (1 - 0.005 * rng.random())
                    recall.append({**key, "layer": layer, "head": head, "density": d,
                                   "recall_predicted": p, "recall_oracle": o,
                                   "kept_fraction": min(1.0, d + 0.08)})
                    gain = (truth.estimate_gain or (1.0,) * spec.heads)[head]
                    dropped = truth.error_scale * (1.0 - o)
                    error.append({**key, "layer": layer, "head": head, "density": d,
                                  "error_dropped": dropped, "error_estimated": dropped * gain})
        if key["step"] == 0:
            continue
        decay = spec.uncond_decay if key["cfg"] == "uncond" else 1.5
        value = change_curve(spec.steps, spec.late_rise, decay)[key["step"]]
        for layer in [f"blocks.{i}" for i in range(len(spec.layers))] + [OUTPUT_LAYER]:
            change.append({**key, "layer": layer, "rel_l1": value * (1 + 0.02 * rng.random()),
                           "cos_dist": value / 10})
    tables = {"attention_stats": stats, "attention_recall": recall, "step_change": change}
    return {**tables, "attention_error": error} if spec.output_errors else tables


def write_traces(directory: Path, spec: TraceSpec, run_id: str = "run0", seed: int = 0) -> Path:
    """Write one file per table and prompt (as a resumable profiler would) into ``directory``."""
    rng = np.random.default_rng(seed)
    meta = metadata(spec, run_id)
    for prompt in range(spec.prompts):
        for name, rows in _tables(spec, prompt, run_id, rng).items():
            columns = {k: [r[k] for r in rows] for k in rows[0]}
            write_table(directory / f"{name}-p{prompt}.parquet", make_table(name, columns), meta)
    return directory


def sample_plan(steps: int = 6, cfg: bool = True) -> Plan:
    """A small valid plan: 4 blocks, blocks.1-2 a background run cached on odd steps."""
    blocks = tuple(f"blocks.{i}" for i in range(4))
    roles = ["foreground", "background", "background", "foreground"]
    specs = [AttentionSpec(density=0.2, dense_steps=(0, 1)), AttentionSpec(),
             AttentionSpec(density=0.3, head_densities=(0.1, 0.3), dense_steps=(0,)),
             AttentionSpec(density=None, mass_threshold=0.9)]
    mask = tuple(s < 2 or s % 2 == 0 for s in range(steps))
    contexts = ("cond", "uncond") if cfg else ("cond",)
    return Plan(
        identity=ModelIdentity("WanTransformer3DModel", "cfg-abc123", "w-1"),
        workload=PlanWorkload(steps=steps, height=96, width=96, frames=9,
                              guidance_scale=5.0, cfg=cfg),
        provenance=Provenance(
            trace_hash="t" * 64, compiler_version="ditplan test",
            compiler_settings={"quality": "balanced", "recall_target": 0.9, "roles": {}},
            roles=RoleClassification("gmm", ("r_attn",), 0.125, dict(zip(blocks, [1, -1, -1, 1],
                                                                          strict=True))),
            predicted_speedup=1.7, predicted_error=0.05,
        ),
        defaults=PlanDefaults(AttentionSpec()),
        block_order=blocks,
        layers={b: LayerPlan(r, f"{b}.attn1", s)
                for b, r, s in zip(blocks, roles, specs, strict=True)},
        runs=(BlockRun.from_masks(blocks[1:3], dict.fromkeys(contexts, mask)),),
    )


def action_plan(steps: int = 8, cfg: bool = True, calibrated: bool = True) -> Plan:
    """``sample_plan`` whose blocks 1-3 forecast on steps 3 and 6 and reuse on the other steps
    after 1 that are not multiples of 4; uncond (with CFG) reuses on 4 and 5 too; calibrated."""
    plan = sample_plan(steps=steps, cfg=cfg)
    cond = "".join("C" if s < 2 or s % 4 == 0 else "F" if s % 3 == 0 else "R"
                   for s in range(steps))
    uncond = "".join("R" if s in (4, 5) else a for s, a in enumerate(cond))
    schedule = {"cond": cond, "uncond": uncond} if cfg else {"cond": cond}
    run = BlockRun(blocks=plan.block_order[1:], schedule=schedule, order=2)
    calibration = Calibration(device="cpu", prompts=2, speedup=1.8, psnr_db=31.25, cosine=0.99,
                              dense_s=9.0, plan_s=5.0, candidates=4) if calibrated else None
    provenance = dataclasses.replace(plan.provenance, calibration=calibration)
    return dataclasses.replace(plan, runs=(run,), provenance=provenance)
