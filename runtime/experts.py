"""apply_expert_plans: a Wan2.2 pipeline's experts each run their section of one plan file."""

from __future__ import annotations

from dataclasses import dataclass

from ditplan.policy.experts import ExpertPlans
from ditplan.policy.plan import Plan, PlanError
from ditplan.runtime.adapters.base import get_adapter
from ditplan.runtime.apply import PlanHandle, apply_plan
from ditplan.runtime.fingerprint import weights_hash

BOUNDARY_TOLERANCE = 1e-6


@dataclass
class ExpertsHandle:
    """The :class:`PlanHandle` of each expert, by pipeline attribute name."""

    handles: dict[str, PlanHandle]

    def reset(self) -> None:
        """Forget every expert's cached residuals, step counts and statistics."""
        for handle in self.handles.values():
            handle.reset()

    def remove(self) -> None:
        """Restore every expert exactly."""
        for handle in self.handles.values():
            handle.remove()

    def stats(self) -> dict:
        """:meth:`PlanHandle.stats` of the pair: shares and density averaged over the experts
        weighted by their transformer calls, cache memory summed (both histories are held);
        each expert's own under ``experts``."""
        each = {name: handle.stats() for name, handle in self.handles.items()}
        calls = {name: handle.tracker.calls_seen for name, handle in self.handles.items()}
        total = sum(calls.values())
        pair = {key: sum(calls[n] * each[n][key] for n in each) / total if total else 0.0
                for key in ("attention_density", "blocks_skipped_share",
                            "blocks_forecast_share")}
        pair["cache_memory_gib"] = sum(s["cache_memory_gib"] for s in each.values())
        return {**pair, "experts": each}


def apply_any_plan(pipe, plan: Plan | ExpertPlans, **options) -> PlanHandle | ExpertsHandle:
    """:func:`apply_expert_plans` for expert plans, else :func:`apply_plan` (same options)."""
    if isinstance(plan, ExpertPlans):
        return apply_expert_plans(pipe, plan, **options)
    return apply_plan(pipe, plan, **options)


def apply_expert_plans(pipe, plans: ExpertPlans, **options) -> ExpertsHandle:
    """Apply each section of ``plans`` to its expert of ``pipe`` (a two-expert WanPipeline).

    Refuses a one-transformer pipeline, another boundary, and sections whose weights are not
    their expert's (swapped experts are named as such). ``options`` go to :func:`apply_plan`
    for every expert.
    """
    adapter = get_adapter(pipe.transformer)
    experts = adapter.experts(pipe)
    if experts != list(plans.experts):
        raise PlanError(
            f"this plan file has a section per expert ({', '.join(plans.experts)}) but this "
            f"pipeline has {', '.join(experts)}; apply a single-transformer plan with "
            "apply_plan, or compile a plan for this pipeline"
        )
    ratio = getattr(pipe.config, "boundary_ratio", None)
    if ratio is None or abs(ratio - plans.boundary_ratio) > BOUNDARY_TOLERANCE:
        raise PlanError(
            f"the plan was compiled at boundary_ratio {plans.boundary_ratio}, this pipeline "
            f"switches experts at {ratio}; set the pipeline's boundary_ratio to the plan's or "
            "compile a plan for this one"
        )
    if options.pop("check_weights", True):
        _check_sections(pipe, plans)  # hashes each expert's weights once; apply_plan need not
    handles: dict[str, PlanHandle] = {}
    try:
        for name, plan in plans.experts.items():
            handles[name] = apply_plan(getattr(pipe, name), plan, check_weights=False,
                                       **options)
    except BaseException:
        ExpertsHandle(handles).remove()
        raise
    return ExpertsHandle(handles)


def _check_sections(pipe, plans: ExpertPlans) -> None:
    hashes = {name: weights_hash(getattr(pipe, name)) for name in plans.experts}
    recorded = {name: plan.identity.weights_hash for name, plan in plans.experts.items()}
    if recorded == hashes:
        return
    names = list(hashes)
    if recorded == dict(zip(names, reversed(hashes.values()), strict=True)):
        raise PlanError(
            "the plan's expert sections are swapped: its 'transformer' section was compiled "
            "for this pipeline's transformer_2 and the other way round; load the experts in "
            "the order the plan was profiled with (transformer = high-noise expert) or "
            "recompile the plan for this pipeline"
        )
    wrong = [name for name in names if recorded[name] != hashes[name]]
    raise PlanError(
        f"the plan's sections {wrong} were compiled for other weights; profile this pipeline "
        "(ditplan profile) and compile a plan for it (ditplan compile-policy)"
    )
