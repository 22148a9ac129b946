"""compile_experts: a two-expert profile -> one plan file, each expert compiled on its own steps."""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Sequence
from pathlib import Path

from ditplan.policy.compiler import (
    Design,
    MeasurePlans,
    Shortlist,
    calibration_shortlist,
    compile_policy,
    pick_measured,
    retime_boundary,
    with_calibration,
)
from ditplan.policy.config import CompilerConfig, CompilerError
from ditplan.policy.experts import ExpertPlans, lift_section
from ditplan.policy.plan import EXPERTS, Plan
from ditplan.profiler.experts import ExpertIndex, read_index
from ditplan.profiler.schema import TraceError

logger = logging.getLogger(__name__)


def is_expert_profile(trace_dir: str | os.PathLike) -> bool:
    """True when ``trace_dir`` is a two-expert profile (it has an expert index)."""
    return read_index(trace_dir) is not None


def check_expert_config(config: CompilerConfig) -> None:
    """Refuse settings a two-expert compile does not support (before any pipeline loads)."""
    if config.refine_rounds:
        raise CompilerError(
            "--refine is not supported for a two-expert (Wan2.2) profile: calibration measures "
            "pairs of candidates end to end, and refinement would move compute steps of one "
            "expert at a time; drop --refine")


def compile_experts(trace_dir: str | os.PathLike, config: CompilerConfig,
                    calibrate: MeasurePlans | None = None) -> ExpertPlans:
    """Compile each expert of a two-expert profile from its own traces, with the same settings.

    Each expert's folder numbers its steps from 0, so ``compile_policy`` compiles it as a plan
    of its own steps; :func:`lift_section` then places it at the steps the profile recorded
    for that expert.

    Args:
        trace_dir: a folder ``ditplan profile`` wrote for a two-expert pipeline.
        config: compiler settings, used for every expert (a target speedup that each expert
            reaches is reached by the pair).
        calibrate: measures expert plans end to end (``--calibrate``); then each expert's
            shortlist is searched as for one transformer, the shortlists are paired by rank,
            and the pair kept follows what the pairs measured (see :func:`_calibrated`).
    Returns:
        the expert plans (one section per expert and the boundary).
    Raises:
        TraceError: not a two-expert profile, or an expert's traces are bad.
        CompilerError: bad settings or an unreachable target.
    """
    check_expert_config(config)
    index = read_index(trace_dir)
    if index is None:
        raise TraceError(f"{trace_dir} is not a two-expert profile (no experts.json)")
    _check_experts(index, trace_dir)
    if calibrate is not None:
        return _calibrated(trace_dir, index, config, calibrate)
    local = {}
    for name in EXPERTS:
        logger.info("compiling %s (steps %s)", name, index.step_ranges[name])
        local[name] = _per_expert(name, compile_policy, Path(trace_dir) / name, config)
    return _lifted(index, local)


def _calibrated(trace_dir: str | os.PathLike, index: ExpertIndex, config: CompilerConfig,
                calibrate: MeasurePlans) -> ExpertPlans:
    """Measure pairs of candidates end to end and keep one by ``pick_measured``'s rules.

    Each expert's candidates are those ``compile_policy --calibrate`` would measure first for
    it alone (:func:`calibration_shortlist`); the i-th of one expert runs with the i-th of the
    other (:func:`pair_by_rank`). Candidates measured near the target are timed again
    (:func:`retime_boundary`). The single-transformer path's second round (designs closer to
    the target once its predictions are scaled by the measured speed) is not run for pairs:
    the predictions are per expert while the measurement is of the pair. Both sections record
    the pair's measurement, ``candidates`` counting the pairs measured.
    """
    shortlists: dict[str, Shortlist] = {}
    for name in EXPERTS:
        logger.info("shortlisting %s (steps %s)", name, index.step_ranges[name])
        shortlists[name] = _per_expert(name, calibration_shortlist, Path(trace_dir) / name,
                                       config)
    ranks = pair_by_rank(*(s.chosen for s in shortlists.values()))
    pairs = [_lifted(index, {name: shortlists[name].plans[i]
                             for name, i in zip(EXPERTS, pair, strict=True)})
             for pair in ranks]
    labels = [" | ".join(f"{name}: {shortlists[name].chosen[i].label}"
                         for name, i in zip(EXPERTS, pair, strict=True)) for pair in ranks]
    measured = retime_boundary(pairs, calibrate(pairs), calibrate, config)
    kept = pick_measured(measured, config, labels)
    calibration = dataclasses.replace(measured[kept], candidates=len(pairs))
    return ExpertPlans({name: with_calibration(plan, calibration)
                        for name, plan in pairs[kept].experts.items()},
                       pairs[kept].boundary_ratio)


def pair_by_rank(first: Sequence[Design], second: Sequence[Design]) -> list[tuple[int, int]]:
    """Indices of the candidate pairs: the i-th of ``first`` with the i-th of ``second``; where
    one list is shorter, its least predicted error fills in for what it lacks. Both lists are
    non-empty (shortlists always are)."""
    pad = (_least_error(first), _least_error(second))
    return [(i if i < len(first) else pad[0], i if i < len(second) else pad[1])
            for i in range(max(len(first), len(second)))]


def _least_error(designs: Sequence[Design]) -> int:
    return min(range(len(designs)), key=lambda i: designs[i].error)


def _per_expert(name: str, compile_, folder: Path, config: CompilerConfig):
    """``compile_(folder, config)``, its CompilerError naming the expert."""
    try:
        return compile_(folder, config)
    except CompilerError as exc:
        raise CompilerError(f"{name}: {exc}") from exc


def _lifted(index: ExpertIndex, local: dict[str, Plan]) -> ExpertPlans:
    """The expert plans of each expert's plan compiled on its own steps."""
    sigmas = [plan.workload.sigmas for plan in local.values()]
    full = None if None in sigmas else tuple(s for part in sigmas for s in part)
    sections = {name: lift_section(plan, index.step_ranges[name][0], index.steps, full)
                for name, plan in local.items()}
    return ExpertPlans(sections, index.boundary_ratio)


def _check_experts(index: ExpertIndex, trace_dir) -> None:
    if tuple(index.step_ranges) != EXPERTS:
        raise TraceError(f"{trace_dir}: the profile's experts are {list(index.step_ranges)}; "
                         f"a plan file has sections {list(EXPERTS)}; re-profile the pipeline")
