"""compile_policy: traces -> Plan (roles, sparsity, block runs; searched, optionally measured)."""

from __future__ import annotations

import dataclasses
import importlib.metadata
import logging
import math
import os
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from ditplan.policy.classify import RoleDecision, classify_roles
from ditplan.policy.config import CompilerConfig, CompilerError
from ditplan.policy.cost import CostModel
from ditplan.policy.estimate import estimate_heads
from ditplan.policy.experts import ExpertPlans
from ditplan.policy.load_profile import Profile, load_profile
from ditplan.policy.plan import (
    IDENTICAL_PSNR_DB,
    AttentionSpec,
    BlockRun,
    Calibration,
    LayerPlan,
    ModelIdentity,
    Plan,
    PlanDefaults,
    Provenance,
    Workload,
    all_heads_dense,
)
from ditplan.policy.plan_io import normalize_plan
from ditplan.policy.quality import attention_error, attention_losses, predicted_error, runs_error
from ditplan.policy.ranking import fit_offsets, skip_kinds, warmup_of
from ditplan.policy.refine import refine
from ditplan.policy.schedule import (
    branches_differ,
    cache_groups,
    compute_mask,
    warmup_steps,
)
from ditplan.policy.search import build_run, run_choices
from ditplan.policy.sparsity import DENSE, LayerSparsity, choose_sparsity

logger = logging.getLogger(__name__)
# Measures candidate plans (or expert plans, each pair end to end) on the device they are for
# (see runtime/calibrate.py): one Calibration per plan, in order; ``repeats=N`` times each over
# N batches (median). policy/ stays torch-free: the command injects it.
MeasurePlans = Callable[..., list[Calibration]]
SEARCH_RECALLS = (0.95, 0.9, 0.85, 0.8)  # step-level designs' sparse attention recalls
# The second calibration round measures designs predicted within this factor above the target
# once the predictions are scaled by how the first round ran. The first round needs no margin
# since the cost model charges the per-call work outside the blocks (policy.cost.CALL_OVERHEAD):
# with a 5% margin a whole-call run on 21 of 32 steps (predicted 1.524x, measured 1.537x at
# 1.9 dB more than the 20-step plan kept, H200) was never measured for a 1.5x target.
CLOSER_BAND = 1.05
BOUNDARY_BAND = 0.03  # candidates measured this close to the target speedup are timed again
BOUNDARY_REPEATS = 3
BOUNDARY_BATCH = 3  # boundary candidates timed again per call, best PSNR first


@dataclass(frozen=True)
class Design:
    """One candidate plan body with its predictions; ``label`` names its family member."""

    config: CompilerConfig
    layers: dict[str, LayerPlan]
    runs: tuple[BlockRun, ...]
    speedup: float
    error: float
    label: str

    @property
    def family(self) -> str:
        """The label without its numeric settings (one per scope, skip kind and CFG reuse)."""
        return " ".join(w for w in self.label.split() if "=" not in w)


@dataclass(frozen=True)
class Shortlist:
    """One trace folder's searched designs and those worth measuring (``chosen``, in
    :func:`shortlist_for_calibration`'s order, the least predicted error first with a target),
    with ``plans``: ``chosen`` assembled as validated plans, one per design."""

    profile: Profile
    decision: RoleDecision
    designs: list[Design]
    chosen: list[Design]
    plans: list[Plan]

    def assemble(self, designs: Sequence[Design]) -> list[Plan]:
        """``designs`` (of this folder) as validated plans."""
        return _assembled(self.profile, self.decision, designs)


def _assembled(profile: Profile, decision: RoleDecision, designs: Sequence[Design]
               ) -> list[Plan]:
    return [normalize_plan(assemble(profile, decision, d)) for d in designs]


def calibration_shortlist(trace_dir: str | os.PathLike, config: CompilerConfig) -> Shortlist:
    """The candidates ``--calibrate`` measures for the traces in ``trace_dir``: the plan space
    searched with ``config`` (which sets ``target_speedup`` and/or ``min_psnr``), shortlisted.

    Raises:
        TraceError: bad traces. CompilerError: a target no design is predicted to reach.
    """
    return _shortlist(*_searchable(trace_dir, config), config)


def _searchable(trace_dir: str | os.PathLike, config: CompilerConfig
                ) -> tuple[Profile, RoleDecision, CostModel]:
    """The traces' profile, its role decision and cost model."""
    profile = load_profile(trace_dir)
    decision = classify_roles(profile, config)
    meta = profile.metadata
    cost = CostModel.for_model(meta.model_config, meta.workload.num_tokens, profile.densities,
                               profile.kept_fraction)
    return profile, decision, cost


def _shortlist(profile: Profile, decision: RoleDecision, cost: CostModel,
               config: CompilerConfig) -> Shortlist:
    designs = search_designs(profile, decision.roles, config, cost)
    chosen = shortlist_for_calibration(designs, config)
    return Shortlist(profile, decision, designs, chosen, _assembled(profile, decision, chosen))


def compile_policy(trace_dir: str | os.PathLike, config: CompilerConfig | None = None,
                   calibrate: MeasurePlans | None = None) -> Plan:
    """Compile the traces in ``trace_dir`` into a Plan; same traces + config -> same plan.

    Args:
        trace_dir: a directory written by ``ditplan profile``.
        config: compiler settings (default: the "balanced" preset). With ``target_speedup`` or
            ``min_psnr`` the compiler searches the plan space (preset designs over recall targets
            x cache intervals, and step-level runs: whole stack or all but the first block,
            reused or forecast, compute steps placed from the traces, CFG reuse).
        calibrate: measures candidate plans on the device (``--calibrate``); then the choice
            follows the measured speed and PSNR, which the plan records. Without it the choice
            follows the predictions (and ``min_psnr``, a measured quantity, is refused).
    Returns:
        the validated Plan (normalized exactly as save/load would give it).
    Raises:
        TraceError: bad traces. CompilerError: bad settings or an unreachable target.
    """
    config = config or CompilerConfig.from_name("balanced")
    profile, decision, cost = _searchable(trace_dir, config)
    if config.target_speedup is None and config.min_psnr is None:
        chosen = design(profile, decision.roles, config, cost)
        return normalize_plan(assemble(profile, decision, chosen))
    if calibrate is None:
        if config.min_psnr is not None:
            raise CompilerError("--min-psnr is a measured quality: add --calibrate (it runs the "
                                "best candidates on calibration prompts), or use --target-speedup")
        designs = search_designs(profile, decision.roles, config, cost)
        return normalize_plan(assemble(profile, decision, pick(designs, config.target_speedup)))
    found = _shortlist(profile, decision, cost, config)
    shortlist, plans = list(found.chosen), list(found.plans)
    measured = calibrate(plans)
    closer = closer_to_target(found.designs, shortlist, measured, config)
    if closer:  # the slack the speed model left, measured too
        shortlist += closer
        more = found.assemble(closer)
        plans += more
        measured += calibrate(more)
    measured = retime_boundary(plans, measured, calibrate, config)
    index = pick_measured(measured, config, [d.label for d in shortlist])
    chosen = with_calibration(plans[index],
                              dataclasses.replace(measured[index], candidates=len(plans)))
    if not config.refine_rounds:
        return chosen

    def measure(options: Sequence[Plan]) -> list[Calibration]:
        return retime_boundary(options, calibrate(options), calibrate, config)

    best, calibration, extra = refine(
        chosen, profile, measure, lambda new, old: _better(new, old, config),
        config.refine_rounds, config.refine_candidates)
    return with_calibration(best, dataclasses.replace(calibration,
                                                      candidates=len(plans) + extra))


def with_calibration(plan: Plan, calibration: Calibration) -> Plan:
    """``plan`` recording what calibration measured for it."""
    provenance = dataclasses.replace(plan.provenance, calibration=calibration)
    return normalize_plan(dataclasses.replace(plan, provenance=provenance))


def _better(new: Calibration, old: Calibration, config: CompilerConfig) -> bool:
    """A refined plan replaces the current one when it measures a higher PSNR and still meets
    the requested speedup and PSNR."""
    return (new.psnr_db > old.psnr_db
            and (config.target_speedup is None
                 or credited_speedup(new) >= config.target_speedup)
            and (config.min_psnr is None or new.psnr_db >= config.min_psnr))


def search_designs(profile: Profile, roles: dict[str, str], config: CompilerConfig,
                   cost: CostModel) -> list[Design]:
    """Every candidate: the preset designs over the search grid, then step-level block runs,
    each with dense attention and with each sparse attention setting (attention_settings),
    sparse after the traces' warm-up, and, for a run with a shorter warm-up, after the run's own
    (every step the run computes after its warm-up sparse), deduplicated."""
    designs = [design(profile, roles, c, cost) for c in config.search_grid()]
    warmup = warmup_steps(_pooled_curves(profile), profile.steps, config)
    choices = run_choices(profile, warmup, config.search_sigma, config.search_newton,
                          config.model_runs)
    step_runs = [(choice, (build_run(profile, choice),)) for choice in choices]
    drift = [runs_error(profile, runs) for _, runs in step_runs]  # the same for every attention
    starts = sorted({warmup, *(c.warmup for c in choices if c.warmup < warmup)}, reverse=True)
    for attention, suffix, optional in attention_settings(profile, config):
        for start in starts:
            layers = layer_plans(profile, roles, attention, start, cost)
            specs = {b: lp.attention for b, lp in layers.items()}
            dense = all(spec.is_dense for spec in specs.values())
            if dense and optional:
                continue  # the traces support no sparsity here: the dense designs cover it
            losses = attention_losses(profile, specs)
            label = suffix if start == warmup else f"{suffix} attention-warmup={start}"
            for (choice, runs), run_error in zip(step_runs, drift, strict=True):
                if start != warmup and choice.warmup != start:
                    continue  # sparse from a run's warm-up pairs with that run only
                designs.append(Design(attention, layers, runs,
                                      cost.predict_speedup(specs, runs, profile.steps,
                                                           profile.contexts),
                                      attention_error(profile, specs, losses, runs) + run_error,
                                      choice.label + label))
            if dense:
                break  # dense attention is the same whatever step sparsity would start at
    return _unique(designs)


def attention_settings(profile: Profile, config: CompilerConfig
                       ) -> list[tuple[CompilerConfig, str, bool]]:
    """The attention settings a search pairs with every run choice: (compiler settings, label
    suffix, optional: a sparse setting left out where the traces support no sparsity). With
    forced densities (``fixed_density``, ``densities``) those alone; else dense, then sparse at
    each of SEARCH_RECALLS, each without and, when the traces record the sparse output's error,
    with the dropped key blocks estimated in the heads where that lowers it (``estimate_dropped``
    "measured"; a set ``estimate_dropped`` is kept)."""
    if config.fixed_density is not None or config.densities:
        return [(config, " densities=given", False)]
    estimates = ((config.estimate_dropped,) if config.estimate_dropped else
                 (None, "measured") if profile.output_error is not None else (None,))
    settings = [(dataclasses.replace(config, fixed_density=1.0), "", False)]
    for recall in SEARCH_RECALLS:
        for estimate in estimates:
            named = f" estimate={estimate}" if estimate and not config.estimate_dropped else ""
            settings.append((dataclasses.replace(config, recall_target=recall,
                                                 estimate_dropped=estimate),
                             f" recall={recall}{named}", True))
    return settings


def _unique(designs: list[Design]) -> list[Design]:
    seen, out = set(), []
    for d in designs:
        key = (tuple(_run_key(r) for r in d.runs),
               tuple(sorted((b, lp.attention) for b, lp in d.layers.items())))
        if key not in seen:
            seen.add(key)
            out.append(d)
    return out


def _run_key(run: BlockRun) -> tuple:
    """Every field of ``run``, hashable (the schedule as sorted items)."""
    values = (getattr(run, f.name) for f in dataclasses.fields(run))
    return tuple(tuple(sorted(v.items())) if isinstance(v, dict) else v for v in values)


def pareto_front(designs: list[Design]) -> list[Design]:
    """Designs no other design beats in both predicted speedup and predicted error."""
    ordered = sorted(designs, key=lambda d: (-d.speedup, d.error))
    front, best_error = [], float("inf")
    for d in ordered:
        if d.error < best_error:
            front.append(d)
            best_error = d.error
    return front


def shortlist_for_calibration(designs: list[Design], config: CompilerConfig) -> list[Design]:
    """At most ``config.calibrate_candidates`` designs worth measuring: with a target, those
    predicted to reach it, the best of each warm-up length first, then of each warm-up and skip
    kind, then of each family, then by error; else the predicted Pareto front, evenly spread
    over its speedups. Warm-up and skip kind are spread because the traces rank them least
    reliably: on the reference model TaylorSeer gained 5 dB from 4 to 8 warm-up steps of 32
    that the error model barely tells apart, and order-2 forecasts beat reuse; on the long
    reference model reuse beat them: a whole-call run reusing after 8 warm-up steps kept 33.3 dB
    on held-out captions where the same schedule forecasting kept 28.7 dB on the calibration
    captions, which measure 0.6-1.2 dB above held-out ones (H200, BENCHMARKS.md)."""
    n = config.calibrate_candidates
    if config.target_speedup is not None:
        pool = [d for d in designs if d.speedup >= config.target_speedup]
        if not pool:
            pick(designs, config.target_speedup)  # raises: says what is reachable
        return _spread(pool, n)
    front = sorted(pareto_front(designs), key=lambda d: d.speedup)
    if len(front) <= n:
        return front
    if n == 1:  # one point spread over the front: its middle
        return [front[len(front) // 2]]
    picks = sorted({round(i * (len(front) - 1) / (n - 1)) for i in range(n)})
    return [front[i] for i in picks]


def closer_to_target(designs: list[Design], measured_designs: list[Design],
                     measured: Sequence[Calibration], config: CompilerConfig) -> list[Design]:
    """With a target, the designs the speed model puts just above it once its predictions are
    scaled by how the measured candidates ran (median measured / predicted speed r): predicted
    in [target / r, CLOSER_BAND x target / r). Where the plans ran faster than predicted
    they compute more and may keep more quality; where slower (3x on the reference model ran
    0.93 of its prediction on a busy host, H200) they are the ones that reach the target.
    Schedules already measured (in any scope: a stack run and a whole-call run on the same steps
    measured within 0.6 dB of each other, H200) are left out, so this round measures new ones.
    They are ranked by the PSNR the first round's measurements predict (ranking.fit_offsets: the
    error model corrected per warm-up and skip kind): at 4x on the long reference model the first
    round measured only forecasts after 4 warm-up steps and reuse after 2, the error model ranked
    reuse after 4 last, and the pick kept 25.5 dB held-out where caching alone kept 26.2 at more
    speed; ranked by the fit, this round measured that pair first, and it was kept: 4.18x at
    29.4 dB held-out (H200, BENCHMARKS.md sessions 22 and 23). At most half as many as the first
    shortlist, spread as it is; none without a target."""
    if config.target_speedup is None or not measured:
        return []
    ratio = statistics.median(m.speedup / d.speedup
                              for m, d in zip(measured, measured_designs, strict=True))
    low = config.target_speedup / ratio
    schedules = {_schedules(d) for d in measured_designs}
    pool = [d for d in designs if low <= d.speedup < CLOSER_BAND * low
            and _schedules(d) not in schedules]
    n = max(1, config.calibrate_candidates // 2)
    offsets = fit_offsets([(d.runs, d.error, m.psnr_db)
                           for d, m in zip(measured_designs, measured, strict=True)])
    if offsets is None:  # every clip measured identical to dense: nothing to correct by
        return _spread(pool, n)
    logger.info("measured offsets of the error model: %s", offsets.describe())
    return _spread(pool, n, rank=lambda d: -offsets.psnr_db(d.runs, d.error))


def _schedules(design: Design) -> tuple:
    """Where each of the design's runs computes, per context (its blocks and forecast aside)."""
    return tuple(tuple(sorted(r.schedule.items())) for r in design.runs)


def retime_boundary(plans: Sequence[Plan] | Sequence[ExpertPlans], measured: list[Calibration],
                    calibrate: MeasurePlans, config: CompilerConfig) -> list[Calibration]:
    """``measured`` (of ``plans``: plans, or expert plans measured as pairs) with the
    candidates that could decide the pick timed again over BOUNDARY_REPEATS batches (median):
    those timed within BOUNDARY_BAND of the target speedup that keep more PSNR than every
    candidate clear of the band above it, best PSNR first, BOUNDARY_BATCH at a time until one
    holds the target (those left keep less PSNR than it, so they cannot be picked). One timed
    batch decides a 3x boundary only to about 1%, and a plan kept for reaching the target by
    0.2% ran under it in the benchmark; at 1.5x most candidates sit within 3%, so only the
    contenders go again; at 5x on the long model 11 of 12 did, and timing them all took longer
    than measuring them (H200, BENCHMARKS.md, session 22)."""
    target = config.target_speedup
    if target is None:
        return measured
    clear = [m.psnr_db for m in measured if credited_speedup(m) >= target * (1 + BOUNDARY_BAND)]
    bar = max(clear, default=-math.inf)
    close = sorted((i for i, m in enumerate(measured)
                    if abs(credited_speedup(m) / target - 1) < BOUNDARY_BAND
                    and m.psnr_db > bar), key=lambda i: -measured[i].psnr_db)
    out = list(measured)
    for start in range(0, len(close), BOUNDARY_BATCH):
        batch = close[start:start + BOUNDARY_BATCH]
        again = calibrate([plans[i] for i in batch], repeats=BOUNDARY_REPEATS)
        for i, m in zip(batch, again, strict=True):
            out[i] = m
        if any(credited_speedup(m) >= target for m in again):
            break
    return out


def _spread(pool: list[Design], n: int,
            rank: Callable[[Design], float] = lambda d: d.error) -> list[Design]:
    """At most ``n`` of ``pool``, ranked by ``rank`` (default predicted error; then speed): the
    best of each warm-up length, then of each warm-up and skip kind, then of each family, then
    the rest in rank order."""
    ordered = sorted(pool, key=lambda d: (rank(d), -d.speedup))
    chosen: list[Design] = []
    for key in (lambda d: warmup_of(d.runs),
                lambda d: (warmup_of(d.runs), skip_kinds(d.runs)), lambda d: d.family):
        firsts = [d for d in _best_by(ordered, key) if d not in chosen]
        chosen += firsts[: n - len(chosen)]
    chosen += [d for d in ordered if d not in chosen][: n - len(chosen)]
    return chosen


def _best_by(ordered: list[Design], key: Callable[[Design], object]) -> list[Design]:
    """The first design of each ``key`` value in ``ordered``, in that order."""
    firsts: dict[object, Design] = {}
    for d in ordered:
        firsts.setdefault(key(d), d)
    return list(firsts.values())


def pick_measured(measured: Sequence[Calibration], config: CompilerConfig,
                  labels: Sequence[str]) -> int:
    """Index of the measured candidate to keep: with a target speedup, the best PSNR at or above
    it (and at or above min_psnr when both are set); with min_psnr alone, the fastest meeting it.
    A candidate whose clips were identical to dense counts as 1x (:func:`credited_speedup`).
    """
    speed = [credited_speedup(m) for m in measured]
    for m, credited, label in zip(measured, speed, labels, strict=True):
        logger.info("calibrated %s: %.2fx, %.2f dB", label, m.speedup, m.psnr_db)
        if credited != m.speedup:
            logger.info("%s changed nothing (clips identical to dense): counted as 1.00x, its "
                        "%.2fx is timing noise", label, m.speedup)
    target, floor = config.target_speedup, config.min_psnr
    ok = [i for i, m in enumerate(measured)
          if (target is None or speed[i] >= target) and (floor is None or m.psnr_db >= floor)]
    if not ok:
        fastest = max(range(len(measured)), key=lambda i: speed[i])
        sharpest = max(range(len(measured)), key=lambda i: measured[i].psnr_db)
        asked = " and ".join(x for x in (target and f"{target:.2f}x",
                                         floor and f"{floor:.1f} dB") if x)
        raise CompilerError(
            f"no calibrated candidate reaches {asked}: of {len(measured)} measured, the fastest "
            f"ran {speed[fastest]:.2f}x at {measured[fastest].psnr_db:.1f} dB and the best kept "
            f"{measured[sharpest].psnr_db:.1f} dB at {speed[sharpest]:.2f}x; ask for what these "
            "reach"
        )
    if target is not None:
        return max(ok, key=lambda i: (measured[i].psnr_db, speed[i]))
    return max(ok, key=lambda i: (speed[i], measured[i].psnr_db))


def credited_speedup(measured: Calibration) -> float:
    """The speedup a candidate is credited with: 1.0 when its clips were identical to dense (it
    changed nothing, so what it measured above or below 1x is the timer's noise, e.g. a busy
    machine), else what it measured."""
    return 1.0 if measured.psnr_db >= IDENTICAL_PSNR_DB else measured.speedup


def design(profile: Profile, roles: dict[str, str], config: CompilerConfig,
           cost: CostModel) -> Design:
    """Build one candidate: warm-up, per-layer attention specs, cache groups, predictions."""
    warmup = warmup_steps(_pooled_curves(profile), profile.steps, config)
    layers = layer_plans(profile, roles, config, warmup, cost)
    runs = _cache_groups(profile, roles, config, warmup)
    specs = {b: lp.attention for b, lp in layers.items()}
    speedup = cost.predict_speedup(specs, runs, profile.steps, profile.contexts)
    error = predicted_error(profile, specs, runs)
    label = (f"background recall={config.recall_target} refresh={config.t_max}->{config.t_min}"
             if config.caching else f"attention-only recall={config.recall_target}")
    return Design(config, layers, runs, speedup, error, label)


def layer_plans(profile: Profile, roles: dict[str, str], config: CompilerConfig,
                warmup: int, cost: CostModel) -> dict[str, LayerPlan]:
    """Each block's role and self-attention spec (sparse after ``warmup`` dense steps). A
    mixed-heads choice the cost model expects no time from (most heads dense: selection costs
    what the sparse heads save) stays dense: it would only lose quality."""
    sparse_steps = np.arange(profile.steps) >= warmup
    settings = profile.metadata.profiler_settings
    attention = profile.metadata.model_config.self_attention

    def spec_of(choice: LayerSparsity, layer: int) -> AttentionSpec:
        dense = all_heads_dense(choice.density, choice.head_densities)
        heads = choice.head_densities or (choice.density,) * profile.recall_predicted.shape[1]
        estimated = (estimate_heads(profile, layer, heads, sparse_steps, config.estimate_dropped)
                     if config.estimate_dropped and not dense else None)
        return AttentionSpec(
            density=choice.density, block_size=int(settings["block_size"]),
            tile=tuple(settings["tile"]), sink=bool(settings["sink"]),
            dense_steps=() if dense else tuple(range(warmup)),
            head_densities=choice.head_densities, estimate_heads=estimated,
        )

    layers = {}
    for i, block in enumerate(profile.blocks):
        choice = choose_sparsity(profile, i, config, sparse_steps)
        spec = spec_of(choice, i)
        if DENSE in (choice.head_densities or ()) and cost.sparse_factor(spec) >= 1.0:
            choice = LayerSparsity(DENSE, None, f"{choice.reason}: no time saved (cost model)")
            spec = spec_of(choice, i)
        logger.debug("%s: %s, density %s (%s)", block, roles[block], choice.density, choice.reason)
        layers[block] = LayerPlan(role=roles[block], attention_module=attention[block],
                                  attention=spec)
    return layers


def _pooled_curves(profile: Profile) -> list[np.ndarray]:
    """The output-change and mean residual-change curves [T], averaged over contexts."""
    return [profile.output_change.mean(axis=0), profile.residual_change.mean(axis=(0, 1))]


def _cache_groups(profile: Profile, roles: dict[str, str], config: CompilerConfig,
                  warmup: int) -> tuple[BlockRun, ...]:
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
    return tuple(BlockRun.from_masks(g, masks) for g in cache_groups(profile.blocks, roles))


def pick(designs: list[Design], target: float | None) -> Design:
    """The first design without a target; else the least predicted error reaching ``target``."""
    if target is None:
        return designs[0]
    feasible = [d for d in designs if d.speedup >= target]
    if not feasible:
        best = max(designs, key=lambda d: (d.speedup, -d.error))
        reachable = math.floor(best.speedup * 100) / 100  # rounded down: 1.996x is not 2.00x
        raise CompilerError(
            f"target speedup {target:.2f}x is not reachable from these traces: the best "
            f"predicted is {best.speedup:.3f}x ({best.label}); ask for at most "
            f"{reachable:.2f}x, or override roles/densities with --role/--density"
        )
    return min(feasible, key=lambda d: (d.error, -d.speedup))


def assemble(profile: Profile, decision: RoleDecision, chosen: Design) -> Plan:
    """Wrap a chosen design into a Plan with identity, workload, provenance and defaults."""
    meta = profile.metadata
    work, settings = meta.workload, meta.profiler_settings
    provenance = Provenance(
        trace_hash=profile.trace_hash, compiler_version=_compiler_version(),
        compiler_settings={**chosen.config.to_settings(), "design": chosen.label},
        roles=decision.classification,
        predicted_speedup=chosen.speedup, predicted_error=chosen.error,
    )
    dense = AttentionSpec(density=1.0, block_size=int(settings["block_size"]),
                          tile=tuple(settings["tile"]), sink=bool(settings["sink"]))
    return Plan(
        identity=ModelIdentity(**vars(meta.fingerprint)),
        workload=Workload(steps=work.steps, height=work.height, width=work.width,
                          frames=work.frames, guidance_scale=work.guidance_scale, cfg=work.cfg,
                          tokens_grid=tuple(work.tokens_grid), sigmas=work.sigmas),
        provenance=provenance, defaults=PlanDefaults(attention=dense),
        block_order=profile.blocks, layers=chosen.layers, runs=chosen.runs,
    )


def _compiler_version() -> str:
    try:
        return "ditplan " + importlib.metadata.version("ditplan")
    except importlib.metadata.PackageNotFoundError:
        return "ditplan (not installed)"
