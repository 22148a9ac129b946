"""compile_experts: a two-expert profile -> one plan file, each expert compiled on its own steps."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from ditplan.policy.compiler import compile_policy
from ditplan.policy.config import CompilerConfig
from ditplan.policy.experts import ExpertPlans, lift_section
from ditplan.policy.plan import EXPERTS
from ditplan.profiler.experts import ExpertIndex, read_index
from ditplan.profiler.schema import TraceError

logger = logging.getLogger(__name__)


def is_expert_profile(trace_dir: str | os.PathLike) -> bool:
    """True when ``trace_dir`` is a two-expert profile (it has an expert index)."""
    return read_index(trace_dir) is not None


def compile_experts(trace_dir: str | os.PathLike, config: CompilerConfig) -> ExpertPlans:
    """Compile each expert of a two-expert profile from its own traces, with the same settings.

    Each expert's folder numbers its steps from 0, so ``compile_policy`` compiles it as a plan
    of its own steps; :func:`lift_section` then places it at the steps the profile recorded
    for that expert.

    Args:
        trace_dir: a folder ``ditplan profile`` wrote for a two-expert pipeline.
        config: compiler settings, used for every expert (a target speedup that each expert
            reaches is reached by the pair).
    Returns:
        the expert plans (one section per expert and the boundary).
    Raises:
        TraceError: not a two-expert profile, or an expert's traces are bad.
        CompilerError: bad settings or an unreachable target.
    """
    index = read_index(trace_dir)
    if index is None:
        raise TraceError(f"{trace_dir} is not a two-expert profile (no experts.json)")
    _check_experts(index, trace_dir)
    local = {}
    for name in EXPERTS:
        logger.info("compiling %s (steps %s)", name, index.step_ranges[name])
        local[name] = compile_policy(Path(trace_dir) / name, config)
    sigmas = [plan.workload.sigmas for plan in local.values()]
    full = None if None in sigmas else tuple(s for part in sigmas for s in part)
    sections = {name: lift_section(plan, index.step_ranges[name][0], index.steps, full)
                for name, plan in local.items()}
    return ExpertPlans(sections, index.boundary_ratio)


def _check_experts(index: ExpertIndex, trace_dir) -> None:
    if tuple(index.step_ranges) != EXPERTS:
        raise TraceError(f"{trace_dir}: the profile's experts are {list(index.step_ranges)}; "
                         f"a plan file has sections {list(EXPERTS)}; re-profile the pipeline")
