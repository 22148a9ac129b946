"""Human-readable plan summary: one line per block with role, density, dense steps and actions."""

from __future__ import annotations

from ditplan.policy.experts import ExpertPlans
from ditplan.policy.plan import ACTIONS, COMPUTE, AttentionSpec, Calibration, Plan

HEADER = ("layer", "role", "density", "dense steps", "steps C/R/F")


def step_ranges(steps) -> str:
    """Compress sorted step indices into "0-5,9" ("-" when empty)."""
    steps = sorted(steps)
    if not steps:
        return "-"
    parts, start = [], steps[0]
    for prev, cur in zip(steps, [*steps[1:], None], strict=True):
        if cur != prev + 1:
            parts.append(str(start) if start == prev else f"{start}-{prev}")
            start = cur
    return ",".join(parts)


def _density(spec: AttentionSpec) -> str:
    if spec.density is None:
        return f"mass>={spec.mass_threshold:g}"
    if spec.is_dense:
        return "dense"
    text = (f"{min(spec.head_densities):.2f}-{spec.density:.2f}/head" if spec.head_densities
            else f"{spec.density:.2f}")
    if spec.estimates():  # heads estimating their dropped blocks: "+est 3/4"
        text += f" +est {sum(spec.estimate_heads)}/{len(spec.estimate_heads)}"
    return text


def _action_counts(actions: str) -> str:
    """"C4 R1 F1": how many steps compute, reuse and forecast."""
    return " ".join(f"{a}{actions.count(a)}" for a in ACTIONS)


def _step_actions(plan: Plan, block: str) -> str:
    """Action counts over the steps the plan's transformer runs (an expert: its range)."""
    start, stop = plan.workload.step_range or (0, plan.workload.steps)
    run = plan.run_of(block)
    if run is None:
        return _action_counts(COMPUTE * (stop - start))
    counts = {c: _action_counts(run.actions(c)[start:stop]) for c in plan.workload.contexts}
    if len(set(counts.values())) == 1:
        return f"{next(iter(counts.values()))} (run {run.name})"
    per = ", ".join(f"{n} {c}" for c, n in counts.items())
    return f"{per} (run {run.name})"


def _calibration_lines(cal: Calibration | None) -> list[str]:
    if cal is None:
        return []
    batch = "" if cal.batch is None else f" in batches of {cal.batch}"
    return [f"measured on {cal.device} ({cal.prompts} prompts){batch}: speedup "
            f"{cal.speedup:.2f}x, PSNR {cal.psnr_db:.1f} dB, cosine {cal.cosine:.4f} vs dense"]


def format_plan(plan: Plan) -> str:
    """Returns a readable multi-line summary of ``plan`` (header lines, then a layer table)."""
    w, ident, prov = plan.workload, plan.identity, plan.provenance
    runs = "" if w.step_range is None else f" (this expert: steps {w.step_range[0]}-" \
        f"{w.step_range[1] - 1})"
    lines = [
        f"plan for {ident.transformer_class} (config {ident.config_hash[:12]}), "
        f"{w.steps} steps{runs}, {w.width}x{w.height} x {w.frames} frames, "
        f"{'CFG ' + format(w.guidance_scale, 'g') if w.cfg else 'no CFG'}",
        f"predicted speedup {prov.predicted_speedup:.2f}x, predicted error "
        f"{prov.predicted_error:.4f} ({prov.compiler_settings.get('quality', '?')}, "
        f"{prov.compiler_version})",
        *_calibration_lines(prov.calibration),
        "",
    ]
    rows = [HEADER]
    for block in plan.block_order:
        layer = plan.layers[block]
        dense = "all" if layer.attention.is_dense else step_ranges(layer.attention.dense_steps)
        rows.append((block, layer.role, _density(layer.attention), dense,
                     _step_actions(plan, block)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(HEADER))]
    lines += ["  ".join(c.ljust(n) for c, n in zip(r, widths, strict=True)).rstrip() for r in rows]
    return "\n".join(lines) + "\n"


def format_experts(plans: ExpertPlans) -> str:
    """A two-expert plan file: the boundary, then each expert's section as :func:`format_plan`
    prints it (its counts cover the expert's own steps)."""
    lines = [f"Wan2.2 plan file with a section per expert, experts switched at boundary_ratio "
             f"{plans.boundary_ratio:g}"]
    for name, plan in plans.experts.items():
        lines += ["", f"[{name}]", format_plan(plan).rstrip("\n")]
    return "\n".join(lines) + "\n"
