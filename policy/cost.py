"""Cost model: predicted end-to-end speedup of a plan from per-block FLOPs at the workload.

Per block and forward, with S video tokens, L text tokens, width W = heads * head_dim:
self-attention 4 S^2 W FLOPs (QK^T and PV); projections 8 S W^2 (q, k, v, o); cross-attention
4 S W^2 + 4 L W^2 + 4 S L W; feed-forward 4 S W F. With joint attention the text tokens join the
self-attention sequence instead (S + L tokens, no cross-attention). Calibration, from the H100
measurements in DESIGN.md (bf16, Wan2.1-1.3B-shaped model at 480p x 81 frames):
- FlexAttention at block density d takes about (SPARSE_FIXED + SPARSE_SLOWDOWN * d) of dense SDPA
  time (7.60 / 3.09 / 1.62 ms at d = 0.5 / 0.2 / 0.1 vs 11.07 ms dense, a linear fit);
- block-mean selection costs SELECTION_OVERHEAD (1.8%) of dense attention;
- estimating the dropped key blocks (``estimate_heads``: block means and one Triton kernel that
  attends to the pooled keys and merges) costs ESTIMATE_OVERHEAD (3%) of dense attention,
  whatever the density and however many heads estimate, from the Wan2.1-1.3B-shape forward on an
  H200 (BENCHMARKS.md, issue 15, session 17: +0.34-0.37 ms a layer at densities 0.2 / 0.1 beside
  11.6 ms of dense attention);
- self-attention is ~54% of the dense forward's time but ~70% of its FLOPs, so other work runs at
  about half attention's FLOP rate: OTHER_TIME_PER_FLOP = 2.0 (attention-FLOP time units).
Patch embedding, time embedding and the head are under 1% of the FLOPs but not of the time:
each call outside a whole-call ("model") run's skips pays CALL_OVERHEAD x the dense blocks' time
for them, the launches and any forecast (2.9% on the reference model at 16 x 48 x 48, H200: a
stack run computing 20 of 32 steps ran 1.573x, the same schedule skipping whole calls 1.611x).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from ditplan.policy.masks import computed
from ditplan.policy.plan import AttentionSpec, BlockRun
from ditplan.profiler.schema import ModelConfig

SPARSE_FIXED = 0.011
SPARSE_SLOWDOWN = 1.35
SELECTION_OVERHEAD = 0.018
ESTIMATE_OVERHEAD = 0.03
OTHER_TIME_PER_FLOP = 2.0
CALL_OVERHEAD = 0.029


def block_flops(model: ModelConfig, tokens: int) -> tuple[float, float]:
    """FLOPs of one block forward at ``tokens`` video tokens.

    Returns:
        (self-attention score/value FLOPs, all other FLOPs).
    """
    width, text = model.num_heads * model.head_dim, model.text_len
    seq = tokens + text if model.joint_attention else tokens
    attention = 4.0 * seq**2 * width
    other = 8.0 * seq * width**2 + 4.0 * seq * width * model.ffn_dim
    if model.cross_attention and not model.joint_attention:
        other += 4.0 * seq * width**2 + 4.0 * text * width**2 + 4.0 * seq * text * width
    return attention, other


@dataclass(frozen=True)
class CostModel:
    """Time per block forward in attention-FLOP units, and the realized density of a mask.

    ``kept`` [D] is the profiled share of block pairs kept at grid densities ``grid`` [D]
    (sink and diagonal blocks included), so the forced blocks are charged.
    """

    attention: float
    other: float
    grid: tuple[float, ...]
    kept: tuple[float, ...]

    @classmethod
    def for_model(cls, model: ModelConfig, tokens: int, grid, kept) -> CostModel:
        attention, other = block_flops(model, tokens)
        return cls(attention, other * OTHER_TIME_PER_FLOP,
                   tuple(float(g) for g in grid), tuple(float(k) for k in kept))

    def realized_density(self, density: float) -> float:
        """Kept share of block pairs at nominal ``density`` (interpolated; 1.0 at 1.0)."""
        xs = np.concatenate([[0.0], self.grid, [1.0]])
        ys = np.concatenate([[0.0], np.maximum.accumulate(self.kept), [1.0]])
        return float(np.interp(density, xs, ys))

    def step_times(self, spec: AttentionSpec, steps: int) -> np.ndarray:
        """[steps] time of one forward of a block with ``spec`` at each step (dense on its
        dense steps, sparse on the others)."""
        return _step_times(self, spec, steps)

    def sparse_factor(self, spec: AttentionSpec) -> float:
        """Sparse / dense attention time on ``spec``'s sparse steps (1.0 for a dense spec)."""
        if spec.is_dense or spec.density is None:  # mass thresholds: density unknown, charge dense
            return 1.0
        heads = spec.head_densities or (spec.density,)
        realized = float(np.mean([self.realized_density(d) for d in heads]))
        estimate = ESTIMATE_OVERHEAD if spec.estimates() else 0.0
        return min(1.0, SELECTION_OVERHEAD + estimate + SPARSE_FIXED + SPARSE_SLOWDOWN * realized)

    def predict_speedup(self, specs: Mapping[str, AttentionSpec], runs: Sequence[BlockRun],
                        steps: int, contexts: Sequence[str]) -> float:
        """Dense time / plan time over all steps and CFG contexts.

        Args:
            specs: block FQN -> AttentionSpec, every block.
            runs: block runs; a block is free where its run reuses or forecasts, and a whole
                call where a "model" run does.
            steps: denoising steps.
            contexts: CFG contexts run per step.
        Returns:
            the predicted speedup (> 0).
        """
        call = (self.other + self.attention) * len(specs)  # one dense call's blocks
        model = next((r for r in runs if r.whole_call), None)
        calls = (steps * len(contexts) if model is None else
                 sum(int(computed(model.actions(c)).sum()) for c in contexts))
        plan_time = CALL_OVERHEAD * call * calls
        in_run = {b for r in runs for b in r.blocks}
        for run in runs:  # a run's blocks cost where the run computes
            block_times = sum(self.step_times(specs[b], steps) for b in run.blocks)  # [T]
            plan_time += sum(float(block_times[computed(run.actions(c))].sum())
                             for c in contexts)
        free = [b for b in specs if b not in in_run]  # blocks outside runs cost at every step
        if free:
            plan_time += len(contexts) * float(sum(self.step_times(specs[b], steps)
                                                   for b in free).sum())
        dense_time = steps * len(contexts) * call * (1 + CALL_OVERHEAD)
        return dense_time / plan_time


@functools.lru_cache(maxsize=4096)
def _step_times(cost: CostModel, spec: AttentionSpec, steps: int) -> np.ndarray:
    """CostModel.step_times, cached: a search prices the same few specs in every candidate."""
    dense = cost.other + cost.attention
    sparse = cost.other + cost.attention * cost.sparse_factor(spec)
    times = np.array([dense if spec.dense_at(step) else sparse for step in range(steps)])
    times.flags.writeable = False
    return times
