"""compile_policy: traces -> Plan (roles, sparsity, cache schedule, budget search)."""

from __future__ import annotations

import importlib.metadata
import logging
import os
from dataclasses import dataclass

import numpy as np

from ditplan.policy.classify import RoleDecision, classify_roles
from ditplan.policy.config import CompilerConfig, CompilerError
from ditplan.policy.cost import CostModel
from ditplan.policy.load_profile import Profile, load_profile
from ditplan.policy.plan import (
    AttentionSpec,
    CacheGroup,
    LayerPlan,
    ModelIdentity,
    Plan,
    PlanDefaults,
    Provenance,
    Workload,
)
from ditplan.policy.plan_io import normalize_plan
from ditplan.policy.quality import predicted_error
from ditplan.policy.schedule import (
    branches_differ,
    cache_groups,
    compute_mask,
    warmup_steps,
)
from ditplan.policy.sparsity import choose_sparsity

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Design:
    """One candidate plan body with its predictions."""

    config: CompilerConfig
    layers: dict[str, LayerPlan]
    groups: tuple[CacheGroup, ...]
    speedup: float
    error: float


def compile_policy(trace_dir: str | os.PathLike, config: CompilerConfig | None = None) -> Plan:
    """Compile the traces in ``trace_dir`` into a Plan; same traces + config -> same plan.

    Args:
        trace_dir: a directory written by ``ditplan profile``.
        config: compiler settings (default: the "balanced" preset). With ``target_speedup``
            the compiler searches recall targets x cache intervals and keeps the candidate with
            the least predicted error that reaches the target.
    Returns:
        the validated Plan (normalized exactly as save/load would give it).
    Raises:
        TraceError: bad traces. CompilerError: bad settings or an unreachable target.
    """
    config = config or CompilerConfig.from_name("balanced")
    profile = load_profile(trace_dir)
    decision = classify_roles(profile, config)
    meta = profile.metadata
    cost = CostModel.for_model(meta.model_config, meta.workload.num_tokens, profile.densities,
                               profile.kept_fraction)
    candidates = [config] if config.target_speedup is None else config.search_grid()
    designs = [design(profile, decision.roles, c, cost) for c in candidates]
    chosen = pick(designs, config.target_speedup)
    return normalize_plan(assemble(profile, decision, chosen))


def design(profile: Profile, roles: dict[str, str], config: CompilerConfig,
           cost: CostModel) -> Design:
    """Build one candidate: warm-up, per-layer attention specs, cache groups, predictions."""
    warmup = warmup_steps(_pooled_curves(profile), profile.steps, config)
    sparse_steps = np.arange(profile.steps) >= warmup
    settings = profile.metadata.profiler_settings
    attention = profile.metadata.model_config.self_attention
    layers = {}
    for i, block in enumerate(profile.blocks):
        choice = choose_sparsity(profile, i, config, sparse_steps)
        spec = AttentionSpec(
            density=choice.density, block_size=int(settings["block_size"]),
            tile=tuple(settings["tile"]), sink=bool(settings["sink"]),
            dense_steps=() if choice.density == 1.0 else tuple(range(warmup)),
            head_densities=choice.head_densities,
        )
        logger.debug("%s: %s, density %s (%s)", block, roles[block], choice.density, choice.reason)
        layers[block] = LayerPlan(role=roles[block], attention_module=attention[block],
                                  attention=spec)
    groups = _cache_groups(profile, roles, config, warmup)
    specs = {b: lp.attention for b, lp in layers.items()}
    speedup = cost.predict_speedup(specs, groups, profile.steps, profile.contexts)
    error = predicted_error(profile, specs, groups)
    return Design(config, layers, groups, speedup, error)


def _pooled_curves(profile: Profile) -> list[np.ndarray]:
    """The output-change and mean residual-change curves [T], averaged over contexts."""
    return [profile.output_change.mean(axis=0), profile.residual_change.mean(axis=(0, 1))]


def _cache_groups(profile: Profile, roles: dict[str, str], config: CompilerConfig,
                  warmup: int) -> tuple[CacheGroup, ...]:
    if not config.caching or config.t_max == 1:
        return ()
    if branches_differ(profile.output_change, config.cfg_divergence):
        masks = {}
        for c, context in enumerate(profile.contexts):
            curves = [profile.output_change[c], profile.residual_change[c].mean(axis=0)]
            own = warmup_steps(curves, profile.steps, config)
            masks[context] = compute_mask(profile.output_change[c], own, config)
    else:
        mask = compute_mask(_pooled_curves(profile)[0], warmup, config)
        masks = dict.fromkeys(profile.contexts, mask)
    return tuple(CacheGroup(blocks=g, compute=dict(masks))
                 for g in cache_groups(profile.blocks, roles))


def pick(designs: list[Design], target: float | None) -> Design:
    """The first design without a target; else the least predicted error reaching ``target``."""
    if target is None:
        return designs[0]
    feasible = [d for d in designs if d.speedup >= target]
    if not feasible:
        best = max(designs, key=lambda d: d.speedup)
        raise CompilerError(
            f"target speedup {target:.2f}x is not reachable from these traces: the best "
            f"predicted is {best.speedup:.2f}x (recall target {best.config.recall_target}, "
            f"cache intervals {best.config.t_max}->{best.config.t_min}); ask for at most "
            f"{best.speedup:.2f}x, or override roles/densities with --role/--density"
        )
    return min(feasible, key=lambda d: (d.error, -d.speedup))


def assemble(profile: Profile, decision: RoleDecision, chosen: Design) -> Plan:
    """Wrap a chosen design into a Plan with identity, workload, provenance and defaults."""
    meta = profile.metadata
    work, settings = meta.workload, meta.profiler_settings
    provenance = Provenance(
        trace_hash=profile.trace_hash, compiler_version=_compiler_version(),
        compiler_settings=chosen.config.to_settings(), roles=decision.classification,
        predicted_speedup=chosen.speedup, predicted_error=chosen.error,
    )
    dense = AttentionSpec(density=1.0, block_size=int(settings["block_size"]),
                          tile=tuple(settings["tile"]), sink=bool(settings["sink"]))
    return Plan(
        identity=ModelIdentity(**vars(meta.fingerprint)),
        workload=Workload(steps=work.steps, height=work.height, width=work.width,
                          frames=work.frames, guidance_scale=work.guidance_scale, cfg=work.cfg,
                          tokens_grid=tuple(work.tokens_grid)),
        provenance=provenance, defaults=PlanDefaults(attention=dense),
        block_order=profile.blocks, layers=chosen.layers, cache_groups=chosen.groups,
    )


def _compiler_version() -> str:
    try:
        return "ditplan " + importlib.metadata.version("ditplan")
    except importlib.metadata.PackageNotFoundError:
        return "ditplan (not installed)"
