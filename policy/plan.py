"""The plan contract (stdlib only): written by the policy compiler, read by the runtime.

A ``Plan`` says, for one model and one workload, how each self-attention layer runs
(``AttentionSpec``, looked up by the attention module's FQN) and, for runs of consecutive blocks
(up to the whole stack), what each CFG branch does at each denoising step: compute, reuse the
cached residual, or forecast it (``BlockRun.schedule[context][step]`` in "C", "R", "F"). All
decisions are static tables, so the runtime reads them without host syncs and every process
decides alike. This module does not read or write files: JSON I/O (``save_plan``,
``load_plan``) lives in ``plan_io``, which imports this one and never the other way round.
A run with target "model" (schema 3.3) covers every block and stands for the whole
transformer call: on its skipped steps the call returns the cached or forecast model output
without running the embeddings or the head either.
A Wan2.2 pipeline's two experts each get a complete plan whose ``workload.step_range`` says
which steps that expert runs (schema 3.1); ``policy.experts`` holds the pair in one file.
"""

from __future__ import annotations

from dataclasses import dataclass, field

PLAN_SCHEMA_VERSION = "3.5"
SUPPORTED_BLOCK_SIZES = (64, 128)
ROLES = ("foreground", "background")
COMPUTE, REUSE, FORECAST = "C", "R", "F"
ACTIONS = (COMPUTE, REUSE, FORECAST)
TARGETS = ("residual", "output", "model")  # "model": schema 3.3
VARIABLES = ("step", "sigma")
EXTRAPOLATIONS = ("taylor", "newton")  # how a forecast extends the computed steps
RECOMPILE = "recompile it with `ditplan compile-policy`"
# A Wan2.2 expert plan file's sections, by pipeline attribute: the high-noise expert first, as
# the pipeline runs them (policy.experts).
EXPERTS = ("transformer", "transformer_2")


class PlanError(ValueError):
    """A plan, or a piece of one, is malformed or does not fit the model it is applied to."""


def _schema(**constraints) -> dict:
    """Field metadata: extra JSON Schema keywords for this field (see plan_schema)."""
    return {"schema": constraints}


def all_heads_dense(density: float | None, head_densities: tuple[float, ...] | None) -> bool:
    """A layer's attention is dense: density 1.0 and no head below it."""
    return density == 1.0 and (head_densities is None or min(head_densities) == 1.0)


@dataclass(frozen=True)
class AttentionSpec:
    """How one self-attention layer runs: dense, or block-mean sparse with these settings.

    Exactly one of ``density`` (share of all block pairs computed, the forced sink/text/diagonal
    blocks included; schema 2.0 -- in 1.x it was a per-row share before forced blocks) and
    ``mass_threshold`` (fewest key blocks whose predicted attention mass reaches it) is set;
    ``density=1.0`` means dense. ``dense_steps`` lists denoising step indices that run dense
    (warm-up, and any late steps the compiler keeps dense). ``head_densities``, when set, gives
    each head its own density; ``density`` is then their maximum, so a runtime that reads only
    ``density`` still keeps at least every head's share. ``estimate_heads`` (schema 3.5), when
    set, says per head whether its dropped key blocks still enter the softmax, each as its mean
    key and value weighted by its key count, instead of leaving their share of attention out.
    """

    density: float | None = field(default=1.0, metadata=_schema(exclusiveMinimum=0, maximum=1))
    mass_threshold: float | None = field(
        default=None, metadata=_schema(exclusiveMinimum=0, maximum=1)
    )
    block_size: int = field(default=128, metadata=_schema(enum=list(SUPPORTED_BLOCK_SIZES)))
    tile: tuple[int, int, int] = field(default=(1, 8, 8), metadata=_schema(items={"minimum": 1}))
    sink: bool = True
    dense_steps: tuple[int, ...] = field(
        default_factory=tuple, metadata=_schema(items={"minimum": 0})
    )
    head_densities: tuple[float, ...] | None = field(
        default=None, metadata=_schema(minItems=1, items={"exclusiveMinimum": 0, "maximum": 1})
    )
    estimate_heads: tuple[bool, ...] | None = field(default=None, metadata=_schema(minItems=1))

    def __post_init__(self):
        if (self.density is None) == (self.mass_threshold is None):
            raise PlanError("set exactly one of density and mass_threshold")
        if self.density is not None and not 0.0 < self.density <= 1.0:
            raise PlanError(f"density must be in (0, 1], got {self.density}")
        if self.mass_threshold is not None and not 0.0 < self.mass_threshold <= 1.0:
            raise PlanError(f"mass_threshold must be in (0, 1], got {self.mass_threshold}")
        if self.block_size not in SUPPORTED_BLOCK_SIZES:
            raise PlanError(
                f"block_size {self.block_size} is not supported; use one of {SUPPORTED_BLOCK_SIZES}"
            )
        if len(self.tile) != 3 or any(int(t) < 1 for t in self.tile):
            raise PlanError(
                f"tile must be three positive ints (frames, height, width), got {self.tile}"
            )
        if any(int(s) < 0 for s in self.dense_steps):
            raise PlanError(
                f"dense_steps must be non-negative step indices, got {self.dense_steps}"
            )
        object.__setattr__(self, "tile", tuple(int(t) for t in self.tile))
        object.__setattr__(self, "dense_steps", tuple(sorted({int(s) for s in self.dense_steps})))
        if self.head_densities is not None:
            self._check_head_densities()
        if self.estimate_heads is not None:
            flags = tuple(self.estimate_heads)
            if not flags or not all(isinstance(f, bool) for f in flags):
                raise PlanError(f"estimate_heads must be one true/false per head, got {flags}")
            if self.head_densities is not None and len(flags) != len(self.head_densities):
                raise PlanError(f"estimate_heads has {len(flags)} entries but head_densities "
                                f"{len(self.head_densities)}: give one per head")
            object.__setattr__(self, "estimate_heads", flags)

    def _check_head_densities(self) -> None:
        heads = tuple(float(d) for d in self.head_densities)
        if self.density is None or not heads or not all(0.0 < d <= 1.0 for d in heads):
            raise PlanError("head_densities must be densities in (0, 1] and need density set")
        if abs(max(heads) - self.density) > 1e-9:
            raise PlanError(
                f"density ({self.density}) must equal max(head_densities) ({max(heads)})"
            )
        object.__setattr__(self, "head_densities", heads)

    @property
    def is_dense(self) -> bool:
        """Every head dense (with head_densities, a layer of density 1.0 may still have sparse
        heads: the compiler's mixed heads keep diffuse heads dense beside sparse ones)."""
        return all_heads_dense(self.density, self.head_densities)

    def dense_at(self, step: int | None) -> bool:
        """True when this layer runs dense attention at denoising step ``step``."""
        return self.is_dense or (step is not None and step in self.dense_steps)

    def estimates(self) -> bool:
        """True when some head estimates its dropped key blocks."""
        return self.estimate_heads is not None and any(self.estimate_heads)

    def density_for_head(self, head: int) -> float | None:
        """The density head ``head`` uses (``density`` unless head_densities is set)."""
        if self.head_densities is None:
            return self.density
        return self.head_densities[head]


@dataclass(frozen=True)
class ModelIdentity:
    """Which transformer the plan is for; the runtime refuses any other."""

    transformer_class: str = field(metadata=_schema(minLength=1))
    config_hash: str = field(metadata=_schema(minLength=1))
    weights_hash: str | None = None


@dataclass(frozen=True)
class Workload:
    """The generation settings the plan was compiled for."""

    steps: int = field(metadata=_schema(minimum=1))
    height: int = field(metadata=_schema(minimum=1))
    width: int = field(metadata=_schema(minimum=1))
    frames: int = field(metadata=_schema(minimum=1))
    guidance_scale: float = field(metadata=_schema(minimum=0))
    cfg: bool
    # Self-attention token grid (frames, height, width) the plan was profiled at; the runtime
    # refuses latents that give another grid.
    tokens_grid: tuple[int, int, int] | None = None
    # The scheduler's sigma at each step [steps]; needed by runs that forecast in sigma.
    sigmas: tuple[float, ...] | None = None
    # Schema 3.1, a Wan2.2 expert's section: the steps [start, stop) this transformer runs
    # (None: all of them). Schedule letters outside it are "C" and never read.
    step_range: tuple[int, int] | None = field(default=None, metadata=_schema(
        items={"minimum": 0}))

    def __post_init__(self):
        if self.step_range is not None:
            start, stop = (int(s) for s in self.step_range)
            if not 0 <= start < stop <= self.steps:
                raise PlanError(f"workload.step_range: {list(self.step_range)} must be [start, "
                                f"stop) with 0 <= start < stop <= steps ({self.steps})")
            object.__setattr__(self, "step_range", (start, stop))

    @property
    def first_step(self) -> int:
        """The first step this plan's transformer runs (0 unless an expert's section)."""
        return 0 if self.step_range is None else self.step_range[0]

    def runs_step(self, step: int) -> bool:
        """True when this plan's transformer runs denoising step ``step``."""
        start, stop = self.step_range or (0, self.steps)
        return start <= step < stop

    @property
    def contexts(self) -> tuple[str, ...]:
        """The CFG contexts a step runs: ("cond", "uncond") with CFG, else ("cond",)."""
        return ("cond", "uncond") if self.cfg else ("cond",)


@dataclass(frozen=True)
class RoleClassification:
    """How roles were decided: per-layer margin from the decision boundary (> 0: foreground)."""

    method: str
    features: tuple[str, ...]
    decision_boundary: float | None
    margins: dict[str, float]


# Calibration's PSNR for clips identical to dense (infinite PSNR, capped): a plan that measures
# this changed nothing, so any speedup it measured is timing noise.
IDENTICAL_PSNR_DB = 100.0


@dataclass(frozen=True)
class Calibration:
    """What the plan measured on calibration prompts against dense output with the same seeds."""

    device: str = field(metadata=_schema(minLength=1))
    prompts: int = field(metadata=_schema(minimum=1))
    speedup: float = field(metadata=_schema(exclusiveMinimum=0))
    psnr_db: float
    cosine: float
    dense_s: float = field(metadata=_schema(exclusiveMinimum=0))
    plan_s: float = field(metadata=_schema(exclusiveMinimum=0))
    candidates: int = field(metadata=_schema(minimum=1))  # measured to choose this one
    # samples per generation when timed (speed depends on it); None: not recorded (before 3.4)
    batch: int | None = field(default=None, metadata=_schema(minimum=1))


@dataclass(frozen=True)
class Provenance:
    """Where the plan came from, what the compiler predicts for it, what calibration measured."""

    trace_hash: str
    compiler_version: str
    compiler_settings: dict
    roles: RoleClassification
    predicted_speedup: float = field(metadata=_schema(exclusiveMinimum=0))
    predicted_error: float = field(metadata=_schema(minimum=0))
    calibration: Calibration | None = None


@dataclass(frozen=True)
class PlanDefaults:
    """Settings for self-attention modules the plan does not list (the compiler: dense)."""

    attention: AttentionSpec


@dataclass(frozen=True)
class LayerPlan:
    """One block: its role and how its self-attention module runs."""

    role: str = field(metadata=_schema(enum=list(ROLES)))
    attention_module: str = field(metadata=_schema(minLength=1))
    attention: AttentionSpec


@dataclass(frozen=True)
class BlockRun:
    """Consecutive blocks that compute, reuse or forecast together, per CFG context and step.

    ``schedule[context]`` has one letter per step: "C" computes the run (and refreshes its
    history), "R" reuses the value of the last computed step, "F" forecasts it by a Taylor
    expansion of order ``order`` (TaylorSeer's finite differences over the computed steps, in
    step index or in sigma), or with ``extrapolation`` "newton" by the polynomial through the
    last ``order`` + 1 computed steps (schema 3.2). ``target`` is what is cached: "residual"
    (out - in, added to the run's current input) or "output" (the run's output itself, as
    TaylorSeer caches), or "model" (schema 3.3): the transformer's whole output, so a skipped
    call runs nothing at all (embeddings and head included); such a run lists every block and
    has one schedule for all CFG contexts.
    """

    blocks: tuple[str, ...] = field(metadata=_schema(minItems=1))
    schedule: dict[str, str] = field(metadata=_schema(
        additionalProperties={"type": "string", "pattern": "^C[CRF]*$"}))
    target: str = field(default="residual", metadata=_schema(enum=list(TARGETS)))
    order: int = field(default=1, metadata=_schema(minimum=1, maximum=2))
    variable: str = field(default="step", metadata=_schema(enum=list(VARIABLES)))
    extrapolation: str = field(default="taylor", metadata=_schema(enum=list(EXTRAPOLATIONS)))

    def __post_init__(self):
        object.__setattr__(self, "blocks", tuple(self.blocks))
        if self.target not in TARGETS or self.variable not in VARIABLES:
            raise PlanError(f"run {self.name}: target must be one of {TARGETS} and variable one "
                            f"of {VARIABLES}, got {self.target!r}, {self.variable!r}")
        if self.extrapolation not in EXTRAPOLATIONS:
            raise PlanError(f"run {self.name}: extrapolation must be one of {EXTRAPOLATIONS}, "
                            f"got {self.extrapolation!r}")
        if self.order not in (1, 2):
            raise PlanError(f"run {self.name}: forecast order must be 1 or 2, got {self.order}")

    @classmethod
    def from_masks(cls, blocks, masks: dict[str, tuple[bool, ...]], skip: str = REUSE,
                   **options) -> BlockRun:
        """A run computing where ``masks[context][step]`` is True, else ``skip`` ("R"/"F")."""
        schedule = {c: "".join(COMPUTE if m else skip for m in mask) for c, mask in masks.items()}
        return cls(blocks=tuple(blocks), schedule=schedule, **options)

    @property
    def name(self) -> str:
        return self.blocks[0] if len(self.blocks) == 1 else f"{self.blocks[0]}..{self.blocks[-1]}"

    @property
    def whole_call(self) -> bool:
        """True for a "model" run: its skipped steps skip the transformer's whole call."""
        return self.target == "model"

    @property
    def forecasts(self) -> bool:
        return any(FORECAST in s for s in self.schedule.values())

    def actions(self, context: str) -> str:
        """The per-step actions of CFG context ``context`` ("cond"/"uncond")."""
        if context not in self.schedule:
            raise PlanError(f"run {self.name} has no schedule for context {context!r}")
        return self.schedule[context]

    def compute_mask(self, context: str) -> tuple[bool, ...]:
        """Per step: True where the run computes in ``context``."""
        return tuple(a == COMPUTE for a in self.actions(context))

    def computes(self, step: int, context: str) -> bool:
        """True when the run computes at ``step`` in ``context``; False: reuse or forecast."""
        return self.actions(context)[step] == COMPUTE


@dataclass(frozen=True)
class Plan:
    """A compiled plan: identity, workload, provenance, per-block entries and cache groups.

    ``block_order`` lists the block FQNs in execution order; ``layers`` is keyed by them.
    """

    identity: ModelIdentity
    workload: Workload
    provenance: Provenance
    defaults: PlanDefaults
    block_order: tuple[str, ...] = field(metadata=_schema(minItems=1))
    layers: dict[str, LayerPlan]
    runs: tuple[BlockRun, ...] = ()
    schema_version: str = field(
        default=PLAN_SCHEMA_VERSION, metadata=_schema(pattern=r"^[0-9]+\.[0-9]+$")
    )

    def __post_init__(self):
        object.__setattr__(self, "block_order", tuple(self.block_order))
        object.__setattr__(self, "runs", tuple(self.runs))
        _check_layers(self)
        _check_runs(self)
        unknown = sorted(set(self.provenance.roles.margins) - set(self.block_order))
        if unknown:
            raise PlanError(f"provenance.roles.margins: unknown blocks {unknown}; {RECOMPILE}")

    def attention_specs(self) -> dict[str, AttentionSpec]:
        """Returns attention module FQN -> AttentionSpec for every listed block."""
        return {lp.attention_module: lp.attention for lp in self.layers.values()}

    def attention_spec(self, module: str) -> AttentionSpec:
        """The spec of self-attention module ``module`` ("blocks.3.attn1"); defaults if unlisted."""
        return self.attention_specs().get(module, self.defaults.attention)

    def run_of(self, block: str) -> BlockRun | None:
        """The run containing block ``block``, or None if it is always computed."""
        return next((r for r in self.runs if block in r.blocks), None)


def _check_layers(plan: Plan) -> None:
    order = plan.block_order
    if len(set(order)) != len(order) or set(order) != set(plan.layers):
        raise PlanError(
            f"block_order {list(order)} must list each key of layers {sorted(plan.layers)} "
            f"exactly once; {RECOMPILE}"
        )
    modules = [lp.attention_module for lp in plan.layers.values()]
    if len(set(modules)) != len(modules):
        raise PlanError(f"layers: two blocks name the same attention_module; {RECOMPILE}")
    for block, lp in plan.layers.items():
        where = f"layers.{block}"
        if lp.role not in ROLES:
            raise PlanError(f"{where}.role: {lp.role!r} is not one of {list(ROLES)}")
        if not lp.attention_module.startswith(block + "."):
            raise PlanError(
                f"{where}.attention_module: {lp.attention_module!r} is not inside block {block!r}"
            )
        late = [s for s in lp.attention.dense_steps if s >= plan.workload.steps]
        if late:
            raise PlanError(
                f"{where}.attention.dense_steps: steps {late} are past the workload's "
                f"{plan.workload.steps} steps; {RECOMPILE}"
            )


def _check_runs(plan: Plan) -> None:
    position = {b: i for i, b in enumerate(plan.block_order)}
    seen: set[str] = set()
    for i, run in enumerate(plan.runs):
        where = f"runs[{i}]"
        unknown = [b for b in run.blocks if b not in position]
        if unknown:
            raise PlanError(f"{where}.blocks: {unknown} are not blocks of the plan; {RECOMPILE}")
        idx = [position[b] for b in run.blocks]
        if idx != list(range(idx[0], idx[0] + len(idx))) or seen & set(run.blocks):
            raise PlanError(
                f"{where}.blocks: {list(run.blocks)} must be consecutive in block_order and "
                f"in no other run; {RECOMPILE}"
            )
        seen |= set(run.blocks)
        _check_schedule(run, plan.workload, where)
        if run.whole_call:
            _check_model_run(run, plan, where)


def _check_model_run(run: BlockRun, plan: Plan, where: str) -> None:
    if run.blocks != plan.block_order:
        raise PlanError(f"{where}: a run with target 'model' skips whole transformer calls and "
                        f"must list every block of block_order; {RECOMPILE}")
    if len(set(run.schedule.values())) > 1:
        raise PlanError(f"{where}.schedule: a run with target 'model' computes all CFG contexts "
                        f"at the same steps (one call may carry them all); {RECOMPILE}")


def _check_schedule(run: BlockRun, workload: Workload, where: str) -> None:
    if set(run.schedule) != set(workload.contexts):
        raise PlanError(
            f"{where}.schedule: has contexts {sorted(run.schedule)}, the workload (cfg="
            f"{workload.cfg}) needs exactly {list(workload.contexts)}; {RECOMPILE}"
        )
    for context, actions in run.schedule.items():
        if len(actions) != workload.steps:
            raise PlanError(
                f"{where}.schedule.{context}: {len(actions)} steps for a {workload.steps}-step "
                f"workload; {RECOMPILE}"
            )
        bad = sorted(set(actions) - set(ACTIONS))
        if bad or not actions.startswith(COMPUTE, workload.first_step):
            raise PlanError(
                f"{where}.schedule.{context}: {actions!r} must be letters {'/'.join(ACTIONS)} "
                f"computing (C) at step {workload.first_step}, the first the transformer runs "
                "(nothing is cached yet)"
            )
        outside = [s for s, a in enumerate(actions) if a != COMPUTE and not workload.runs_step(s)]
        if outside:
            raise PlanError(f"{where}.schedule.{context}: steps {outside} are outside "
                            f"workload.step_range and must be C; {RECOMPILE}")
    if run.forecasts and run.variable == "sigma":
        sigmas = workload.sigmas
        if sigmas is None or len(sigmas) != workload.steps:
            raise PlanError(f"{where}.variable: forecasting in sigma needs workload.sigmas with "
                            f"one value per step; {RECOMPILE}")

