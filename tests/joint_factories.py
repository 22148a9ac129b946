"""Plans for tiny joint-attention transformers (FLUX.1, Qwen-Image), for CPU tests."""

from __future__ import annotations

from ditplan.policy.plan import (
    AttentionSpec,
    LayerPlan,
    ModelIdentity,
    Plan,
    PlanDefaults,
    Provenance,
    RoleClassification,
    Workload,
)
from ditplan.runtime.adapters.base import get_adapter
from ditplan.runtime.fingerprint import model_fingerprint


def tiny_joint_plan(model, *, steps: int = 2, density: float = 0.3, tile=(1, 4, 8), runs=(),
                    cfg: bool = False) -> Plan:
    """A valid plan for ``model`` (a tiny FLUX or Qwen-Image, whose attention layers are
    ``<block>.attn``): every layer at ``density`` from step 1 (step 0 dense), ``runs``
    (BlockRun) as given."""
    blocks = tuple(name for name, _ in get_adapter(model).blocks(model))
    spec = AttentionSpec(density=density, block_size=64, tile=tuple(tile), sink=False,
                         dense_steps=(0,))
    return Plan(
        identity=ModelIdentity(**model_fingerprint(model)),
        workload=Workload(steps=steps, height=128, width=160, frames=1, guidance_scale=3.5,
                          cfg=cfg),
        provenance=Provenance(
            trace_hash="0" * 64, compiler_version="test", compiler_settings={},
            roles=RoleClassification("fixed", ("r_attn",), None, dict.fromkeys(blocks, 1.0)),
            predicted_speedup=1.5, predicted_error=0.0),
        defaults=PlanDefaults(AttentionSpec()),
        block_order=blocks,
        layers={b: LayerPlan("foreground", f"{b}.attn", spec) for b in blocks},
        runs=tuple(runs),
    )
