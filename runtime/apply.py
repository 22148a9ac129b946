"""apply_plan / apply_sparse_attention: check a plan fits a live pipeline, install it, undo it."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field

from torch import nn

from ditplan.policy.plan import AttentionSpec, Plan, PlanError
from ditplan.runtime.adapters.base import block_io, get_adapter
from ditplan.runtime.cache import RunState, install_block_runs, remove_block_runs
from ditplan.runtime.compiled_blocks import (
    CompiledBlocks,
    check_not_compiled,
    compile_options,
    install_compiled_blocks,
    remove_compiled_blocks,
)
from ditplan.runtime.context import (
    StepTracker,
    install_step_tracker,
    refuse_applied,
    remove_step_tracker,
)
from ditplan.runtime.fingerprint import config_hash, weights_hash
from ditplan.runtime.kernels.registry import parse_backend
from ditplan.runtime.model_run import install_model_runs, remove_model_runs
from ditplan.runtime.parallel import (
    check_chunks,
    check_parallel_config,
    check_same_on_ranks,
    enable,
    mean_over_ranks,
    refuse_parallel_model,
    ulysses_group,
)
from ditplan.runtime.permutation import TokenPermuter
from ditplan.runtime.sparse import (
    LayerRuntime,
    check_head_counts,
    install_sparse_layers,
    resolve_layer_specs,
    restore_processors,
    shared_tile,
)

logger = logging.getLogger(__name__)

CHECK_RANKS = "DITPLAN_CHECK_RANKS"  # "1": ranks compare their per-call decisions (debug)


@dataclass
class PlanHandle:
    """What :func:`apply_plan` installed; ``remove()`` restores the transformer exactly."""

    transformer: nn.Module
    tracker: StepTracker
    layers: list[LayerRuntime]
    runs: list[RunState]
    num_blocks: int
    _originals: dict = field(repr=False)
    _hooks: list = field(repr=False)
    _blocks: dict = field(repr=False)
    group: object = field(default=None, repr=False)  # the Ulysses ranks' process group, if any
    compiled: bool = False  # apply_plan(compile=) compiled the blocks (remove() undoes it)

    def reset(self) -> None:
        """Forget cached residuals, step counts and statistics (a new generation)."""
        self.tracker.reset_state(self.transformer)
        self.tracker.calls_seen = 0
        for run in self.runs:
            run.reset()
        for layer in self.layers:
            layer.reset_stats()

    def remove(self) -> None:
        """Restore the processors and remove ditplan's hooks; diffusers' context parallelism,
        when parallel= enabled it, stays (diffusers cannot undo it)."""
        restore_processors(self._originals)
        for hook in self._hooks:
            hook.remove()
        remove_block_runs(self._blocks)
        if self.compiled:
            remove_compiled_blocks(self._blocks)
        remove_model_runs(self.transformer)
        remove_step_tracker(self.transformer)
        self._originals, self._hooks, self._blocks = {}, [], {}

    def stats(self) -> dict:
        """Since reset: achieved attention density, share of block evaluations skipped (reused
        or forecast), share of run calls forecast, and the peak memory of cached run state.

        Under context parallelism the density is averaged over the ranks (each selects for its
        own heads; a collective, so call it on every rank) and the cache memory is this
        rank's (each holds its tokens' share)."""
        calls = self.tracker.calls_seen
        densities = [
            d for d in (layer.achieved_density() for layer in self.layers) if d is not None
        ]
        if self.group is not None:
            densities = mean_over_ranks(densities, self.group)
        # a batched-CFG call evaluates each block once per branch
        branch_calls = max((r.branch_calls for r in self.runs), default=calls)
        skipped = sum(len(r.run.blocks) * (r.branch_calls - len(r.computed_steps))
                      for r in self.runs)
        forecast = sum(len(r.run.blocks) * r.forecast_calls for r in self.runs)
        evaluations = self.num_blocks * branch_calls
        return {
            "attention_density": sum(densities) / len(densities) if densities else 1.0,
            "blocks_skipped_share": skipped / evaluations if evaluations else 0.0,
            "blocks_forecast_share": forecast / evaluations if evaluations else 0.0,
            "cache_memory_gib": sum(r.peak_bytes for r in self.runs) / 2**30,
        }


def _transformer_of(pipe_or_transformer) -> nn.Module:
    return getattr(pipe_or_transformer, "transformer", pipe_or_transformer)


def check_plan_fits(plan: Plan, transformer: nn.Module, adapter, *, check_weights: bool) -> None:
    """Refuse a plan compiled for another model, with a message that says what to do."""
    identity = plan.identity
    cls = type(transformer).__name__
    redo = "profile this model (ditplan profile) and compile a plan for it (ditplan compile-policy)"
    if identity.transformer_class != cls:
        raise PlanError(
            f"the plan is for a {identity.transformer_class}, this model is a {cls}; {redo}"
        )
    if identity.config_hash != config_hash(transformer):
        raise PlanError(f"the plan was compiled for another {cls} configuration; {redo}")
    if (
        check_weights
        and identity.weights_hash
        and identity.weights_hash != weights_hash(transformer)
    ):
        raise PlanError(f"the plan was compiled for other weights of this {cls}; {redo}")
    blocks = [name for name, _ in adapter.blocks(transformer)]
    if list(plan.block_order) != blocks:
        raise PlanError(f"the plan's blocks {plan.block_order[:3]}... are not this model's; {redo}")
    attention = {name for name, _ in adapter.attention_layers(transformer)}
    unknown = sorted({lp.attention_module for lp in plan.layers.values()} - attention)
    if unknown:
        raise PlanError(f"the plan names attention modules this model lacks: {unknown}; {redo}")


def _check_experts(plan: Plan, pipe, adapter) -> None:
    """Refuse a single-transformer plan on a two-expert pipeline, and an expert's section on a
    one-transformer pipeline (a transformer passed alone is taken as the plan says)."""
    experts = adapter.experts(pipe)
    if len(experts) > 1:
        raise PlanError(
            f"this pipeline has {len(experts)} experts ({', '.join(experts)}) and this plan "
            "covers one transformer; profile the pipeline, compile a plan file with a section "
            "per expert and apply it with ditplan.runtime.experts.apply_expert_plans"
        )
    if experts and plan.workload.step_range is not None:
        raise PlanError(
            f"this plan is one expert's section (steps {list(plan.workload.step_range)}) and "
            "this pipeline has a single transformer; compile a plan for this pipeline"
        )


def _check_step(state, plan: Plan) -> None:
    steps = plan.workload.steps
    announced = state.num_inference_steps
    if state.step >= steps or (announced is not None and announced != steps):
        seen = f"{announced} steps" if announced is not None else f"step {state.step}"
        raise PlanError(
            f"this generation runs {seen} but the plan was compiled for {steps} denoising "
            "steps; run with the plan's step count or compile a plan for this one"
        )
    if not plan.workload.runs_step(state.step):
        start, stop = plan.workload.step_range
        raise PlanError(
            f"this expert was called at step {state.step} but its plan covers steps "
            f"[{start}, {stop}): this pipeline's boundary differs from the plan's; use the "
            "plan's boundary_ratio or compile a plan for this pipeline"
        )


def apply_plan(
    pipe, plan: Plan, *, backend: str = "auto", check_weights: bool = True,
    cfg_batch_order: tuple[str, ...] = ("uncond", "cond"), parallel=None,
    ulysses_chunks: int = 1, compile: bool | dict = False,
) -> PlanHandle:
    """Execute ``plan`` on ``pipe`` (a diffusers pipeline, or its transformer).

    Checks identity and module names, then installs per-layer sparse attention and the cache
    hooks of every block run (compute, reuse or forecast per CFG branch and step); all per-step
    decisions are read from the plan, so every process of a parallel run decides alike
    (``DITPLAN_CHECK_RANKS=1`` compares them across ranks at every call and run).

    Args:
        pipe: a pipeline with a ``.transformer``, or the transformer itself.
        plan: a loaded :class:`Plan` (see ``ditplan.policy.plan_io.load_plan``).
        backend: attention kernel backend (``auto``, ``flex``, ``torch``, ``dense``).
        check_weights: also compare the weights hash when the plan records one.
        cfg_batch_order: for pipelines that batch CFG into one call (no ``cache_context``):
            the branches stacked along the batch, in order (diffusers' convention:
            unconditional first). Each part then follows its own branch's schedule.
        parallel: a diffusers ``ContextParallelConfig(ulysses_degree=N)``: ditplan installs
            the plan, then makes the transformer context-parallel itself (never call
            ``enable_parallelism`` first). Every rank must call this with the same plan.
        ulysses_chunks: under ``parallel``, split each rank's sparse attention into this many
            head chunks whose all-to-alls overlap the attention (the head count must divide
            by ``ulysses_chunks * N``); 1: diffusers' all-to-alls around one call.
        compile: True, or a dict of ``torch.compile`` keyword arguments: compile each
            transformer block's own forward, beneath the plan's cache hooks (see
            ``ditplan.runtime.compiled_blocks``: compiling the whole model with a plan makes
            dynamo keep a graph per combination of the runs' decisions and, past its recompile
            limit, run eagerly). Do not also compile the transformer.

    Returns:
        A :class:`PlanHandle`; ``handle.remove()`` restores the transformer exactly (but for
        context parallelism, which stays).
    """
    transformer = _transformer_of(pipe)
    adapter = get_adapter(transformer)
    _check_experts(plan, pipe, adapter)
    check_plan_fits(plan, transformer, adapter, check_weights=check_weights)
    if parallel is not None and any(r.whole_call for r in plan.runs):
        raise PlanError("this plan skips whole transformer calls (a run with target 'model'), "
                        "which context parallelism does not support yet; compile a plan without "
                        "them (`compile-policy --no-model-runs`) or run on one GPU")
    refuse_parallel_model(transformer)
    check_chunks(ulysses_chunks, parallel)
    cp_plan = None if parallel is None else check_parallel_config(parallel, transformer, adapter,
                                                                  ulysses_chunks)
    backend = parse_backend(backend)
    compiling = compile_options(compile)
    blocks = dict(adapter.blocks(transformer))
    check_not_compiled(blocks, compiling is not None)
    names = [name for name, _ in adapter.attention_layers(transformer)]
    specs = resolve_layer_specs(names, {n: plan.attention_spec(n) for n in names})
    check_head_counts(transformer, adapter, specs)
    permuter = TokenPermuter(shared_tile(specs), plan.workload.tokens_grid)
    refuse_applied(transformer)
    run_options = dict(positions=plan.workload.sigmas,
                       batch_order=cfg_batch_order if plan.workload.cfg else None,
                       first_step=plan.workload.first_step)
    tracker = StepTracker(plan.workload.steps)
    model_runs = install_model_runs(transformer, plan.runs, tracker, **run_options)
    install_step_tracker(transformer, tracker=tracker)  # wraps the model run: reads the step first
    tracker.listeners.append(lambda state: _check_step(state, plan))
    originals, layers, hooks = install_sparse_layers(
        transformer, adapter, specs, tracker, permuter, backend, ulysses_chunks
    )
    if compiling is not None:  # first: the innermost hook, beneath the cache hooks
        install_compiled_blocks(blocks, compiling)
    block_runs = [r for r in plan.runs if not r.whole_call]
    runs = model_runs + install_block_runs(blocks, block_runs, tracker,
                                           io=block_io(adapter, transformer), **run_options)
    handle = PlanHandle(transformer, tracker, layers, runs, len(blocks), originals, hooks, blocks,
                        compiled=compiling is not None)
    if parallel is not None:
        handle.group = _enable_parallel(handle, transformer, parallel, cp_plan, adapter)
        if os.environ.get(CHECK_RANKS) == "1":
            _check_ranks(tracker, runs, handle.group)
    logger.info("plan applied: %d sparse attention layers, %d block runs", len(layers), len(runs))
    return handle


def compile_blocks(pipe, compile: bool | dict = True) -> CompiledBlocks:
    """Without a plan: compile each block of ``pipe``'s transformer (every expert's, for a
    two-expert pipeline) as ``apply_plan(..., compile=)`` does; ``.remove()`` undoes it.

    Args:
        pipe: a pipeline, or a transformer.
        compile: True, or a dict of ``torch.compile`` keyword arguments.
    """
    transformer = _transformer_of(pipe)
    adapter = get_adapter(transformer)
    names = adapter.experts(pipe) if transformer is not pipe else []
    transformers = [getattr(pipe, name) for name in names] or [transformer]
    blocks = {f"{i}.{name}": block for i, t in enumerate(transformers)
              for name, block in adapter.blocks(t)}
    return CompiledBlocks(blocks, compile)


def enable_parallel(pipe, parallel) -> None:
    """Context parallelism without a plan (dense attention), through ditplan's refusals.

    Args:
        pipe: a pipeline with a ``.transformer``, or the transformer itself.
        parallel: a diffusers ``ContextParallelConfig(ulysses_degree=N)``.
    """
    transformer = _transformer_of(pipe)
    adapter = get_adapter(transformer)
    refuse_parallel_model(transformer)
    enable(transformer, parallel, check_parallel_config(parallel, transformer, adapter), adapter)


def _enable_parallel(handle, transformer: nn.Module, config, cp_plan: dict, adapter):
    """Context parallelism over ditplan's installation (removed again when enabling fails);
    the Ulysses process group."""
    try:
        handle._hooks.extend(enable(transformer, config, cp_plan, adapter))
    except BaseException:
        handle.remove()
        raise
    return ulysses_group(transformer._parallel_config)


def _check_ranks(tracker: StepTracker, runs: list[RunState], group) -> None:
    """Debug: every rank compares its (context, step) at each transformer call and each
    run's actions once decided (before the run's blocks enter any collective)."""
    tracker.listeners.append(
        lambda state: check_same_on_ranks(f"call {state.context} step {state.step}", group))
    for index, run in enumerate(runs):
        def begin(run=run, decide=run.begin, index=index):
            decide()
            state = tracker.state
            check_same_on_ranks(f"run {index} {state.context} step {state.step}: "
                                f"{run.branches} {run.branch_actions}", group)

        run.begin = begin


class SparseAttentionHandle:
    """Undo handle returned by :func:`apply_sparse_attention`."""

    def __init__(self, transformer: nn.Module, originals: dict, runtimes: list, hooks: list):
        self.transformer = transformer
        self.layers = runtimes
        self._originals = originals
        self._hooks = hooks

    def remove(self) -> None:
        """Restore the original processors and forward exactly."""
        restore_processors(self._originals)
        for hook in self._hooks:
            hook.remove()
        remove_step_tracker(self.transformer)
        self._originals, self._hooks = {}, []


def apply_sparse_attention(
    transformer: nn.Module,
    settings: AttentionSpec | Mapping[str, AttentionSpec],
    *,
    backend: str = "auto",
    num_inference_steps: int | None = None,
    parallel=None,
    ulysses_chunks: int = 1,
) -> SparseAttentionHandle:
    """Install block-mean sparse attention on every self-attention layer of ``transformer``.

    Args:
        transformer: a supported diffusers transformer (see ``get_adapter``).
        settings: one :class:`AttentionSpec` for all layers, or a mapping from self-attention
            module name (e.g. ``"blocks.3.attn1"``) to spec; unnamed layers stay dense.
        backend: kernel backend (``auto``, ``flex``, ``torch``, ``dense``).
        num_inference_steps: wraps the call count into steps when the pipeline does not pass
            ``step_index`` through ``cache_context``.
        parallel: a diffusers ``ContextParallelConfig(ulysses_degree=N)`` enabled after the
            installation (as in :func:`apply_plan`).
        ulysses_chunks: head chunks of the pipelined all-to-all (as in :func:`apply_plan`).

    Returns:
        A handle whose ``remove()`` restores the transformer (but for context parallelism).
    """
    adapter = get_adapter(transformer)
    names = [name for name, _ in adapter.attention_layers(transformer)]
    specs = resolve_layer_specs(names, settings)
    check_head_counts(transformer, adapter, specs)
    refuse_parallel_model(transformer)
    check_chunks(ulysses_chunks, parallel)
    cp_plan = None if parallel is None else check_parallel_config(parallel, transformer, adapter,
                                                                  ulysses_chunks)
    permuter = TokenPermuter(shared_tile(specs))
    backend = parse_backend(backend)
    tracker = install_step_tracker(transformer, num_inference_steps)
    installed = install_sparse_layers(transformer, adapter, specs, tracker, permuter, backend,
                                      ulysses_chunks)
    handle = SparseAttentionHandle(transformer, *installed)
    if parallel is not None:
        _enable_parallel(handle, transformer, parallel, cp_plan, adapter)
    return handle
