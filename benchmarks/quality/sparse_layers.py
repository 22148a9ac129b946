"""Sparse attention alone at one density, in the layers the compiler makes sparse or in all."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from benchmarks.quality.methods import Installed, Method, NotApplicable
from benchmarks.quality.plans import estimated_head_count, plan_key
from ditplan.policy.compiler import compile_policy
from ditplan.policy.config import CompilerConfig, CompilerError
from ditplan.runtime.apply import apply_plan

LAYER_CHOOSER = "balanced"  # the preset whose sparse-only plan picks the layers
FAMILY = "ditplan-sparse-only"
EVERY_LAYER_FAMILY = "sparse-every-layer"
ESTIMATED_SUFFIX = "-estimated"  # rows whose sparse heads estimate the dropped key blocks


def estimated_suffix(mode: str | None) -> str:
    """The family-name suffix of rows compiled with ``estimate_dropped=mode``."""
    return {None: "", "measured": ESTIMATED_SUFFIX, "all": ESTIMATED_SUFFIX + "-all"}[mode]


@dataclass(frozen=True)
class LayerChoice:
    """Every block of the model in order, and those a sparse-only plan runs sparse."""

    blocks: tuple[str, ...]
    sparse: tuple[str, ...]

    def densities(self, density: float) -> dict[str, float]:
        """Per-block densities: ``density`` in the chosen blocks, dense (1.0) elsewhere."""
        return {b: density if b in self.sparse else 1.0 for b in self.blocks}


def choose_layers(trace_dir: Path, preset: str = LAYER_CHOOSER) -> LayerChoice:
    """The blocks a sparse-only plan of ``preset`` (no caching) gives sparse attention."""
    plan = compile_policy(trace_dir, CompilerConfig.from_name(preset, caching=False))
    sparse = tuple(b for b, layer in plan.layers.items() if not layer.attention.is_dense)
    return LayerChoice(tuple(plan.layers), sparse)


def every_layer(choice: LayerChoice) -> LayerChoice:
    """Every block of ``choice`` sparse, whatever the compiler chose."""
    return LayerChoice(choice.blocks, choice.blocks)


def sparse_layers_method(density: float, trace_dir: Callable[[], Path],
                         choice: Callable[[], LayerChoice], *, backend: str,
                         every: bool = False, estimate_dropped: str | None = None) -> Method:
    """A no-caching plan with ``density`` in ``choice()``'s sparse blocks and the compiler's dense
    warm-up steps; the other blocks stay dense. ``every``: ``choice`` is `every_layer`'s (the
    rows are named and described so). ``estimate_dropped``: which sparse heads estimate their
    dropped key blocks from block means, "measured" or "all" (CompilerConfig; family name
    suffixed ``-estimated`` or ``-estimated-all``).

    ``choice`` is shared by the densities of one run (compiled once, on first install).
    """

    def install(pipe) -> Installed:
        try:
            chosen = choice()
            if not chosen.sparse:
                raise NotApplicable(f"the compiler's sparse-only {LAYER_CHOOSER} plan keeps "
                                    "every layer dense at this workload (the traces support no "
                                    "sparsity)")
            config = CompilerConfig.from_name(LAYER_CHOOSER, caching=False,
                                              densities=chosen.densities(density),
                                              estimate_dropped=estimate_dropped)
            plan = compile_policy(trace_dir(), config)
        except CompilerError as error:
            raise NotApplicable(str(error)) from error
        handle = apply_plan(pipe, plan, backend=backend)
        recorded = {"sparse_layers": list(chosen.sparse),
                    "predicted_speedup": plan.provenance.predicted_speedup,
                    "estimated_heads": estimated_head_count(plan)}
        return Installed(undo=handle.remove, stats=lambda: {**handle.stats(), **recorded},
                         reset=handle.reset, plan_key=plan_key(plan))

    suffix = estimated_suffix(estimate_dropped)
    estimate = (f"; dropped blocks estimated from block means ({estimate_dropped} heads)"
                if estimate_dropped else "")
    if every:
        params = {"density": density, "layers_from": "every layer, caching off",
                  "estimate_dropped": estimate_dropped}
        return Method(EVERY_LAYER_FAMILY + suffix, f"d={density:g}", install, params,
                      notes=f"density {density:g} in every layer after the {LAYER_CHOOSER} "
                            f"plan's dense warm-up steps; no caching{estimate}")
    params = {"density": density, "layers_from": f"{LAYER_CHOOSER}, caching off",
              "estimate_dropped": estimate_dropped}
    return Method(FAMILY + suffix, f"d={density:g}", install, params,
                  notes=f"density {density:g} in the layers a sparse-only {LAYER_CHOOSER} plan "
                        f"makes sparse, the others dense; no caching{estimate}")
