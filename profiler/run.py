"""Profiling orchestration: load the pipeline, run prompts x seeds under the recorder, write traces.

Two ways to drive a generation (``ProfileConfig.mode``):

- **clip** (reference model; the default for it): the pipeline runs as usual, but its latents
  are teacher-forced onto the noising path of a reference clip drawn for the prompt
  (clip_inputs.py), so the clip's ground-truth foreground applies at every step.
- **sample** (any model): two generations per (prompt, seed) with the same noise. The first,
  unrecorded, gives the generated clean video or image, x0_hat of the last step, from which the
  foreground is estimated (generated.py, foreground.py); the second is recorded with that
  mask. One mask per prompt follows ProfilingDiT's finding that the foreground/background
  split is stable across steps, and the final x0_hat is the least noisy prediction the model
  makes.

Each (prompt, seed) is one unit: its tables are written atomically, then the manifest marks it
finished, so an interrupted run resumes with the next unit.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ditplan.profiler import clip_inputs, foreground
from ditplan.profiler.config import (
    DEFAULT_FRAMES,
    ProfileConfig,
    ProfileConfigError,
    RecorderSettings,
)
from ditplan.profiler.experts import ExpertIndex, read_index, write_index
from ditplan.profiler.generated import generated_foreground
from ditplan.profiler.manifest import Manifest
from ditplan.profiler.recorders import ProfileRecorder
from ditplan.profiler.rows import TraceRows
from ditplan.profiler.schema import (
    ModelConfig,
    ModelFingerprint,
    TraceError,
    TraceMetadata,
    Workload,
)
from ditplan.profiler.writer import build_tables, library_versions, unit_name, write_unit
from ditplan.runtime.adapters.base import get_adapter
from ditplan.runtime.fingerprint import model_fingerprint
from ditplan.runtime.loading import load_pipeline
from ditplan.runtime.pipeline_calls import PipelineCall

logger = logging.getLogger(__name__)

REPORT_NAME = "report.png"


def run_id_of(identity: dict) -> str:
    """A stable id for a run's arguments (the same arguments resume the same run)."""
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def resolve_mode(mode: str, pipe) -> str:
    """'clip' or 'sample': auto picks clip for the reference pipeline; clip needs it."""
    from ditplan.reference.pipeline import ReferenceVideoPipeline

    is_reference = isinstance(pipe, ReferenceVideoPipeline)
    if mode == "clip" and not is_reference:
        raise ValueError(f"--mode clip needs the reference model (noised reference clips); "
                         f"{type(pipe).__name__} gets --mode sample")
    if mode == "auto":
        return "clip" if is_reference else "sample"
    return mode


def profile_pipeline(config: ProfileConfig, *, pipe=None) -> list[Path]:
    """Profile every (prompt, seed) of ``config`` into ``config.out``; resumes a finished part.

    A two-expert pipeline (Wan2.2 A14B: ``transformer_2`` and ``boundary_ratio``) gets both
    experts recorded: each into its own trace folder ``config.out/<expert>/`` numbering its
    steps from 0, and the steps each expert ran, as recorded, into ``config.out/experts.json``
    (profiler.experts).

    Args:
        config: the run's settings.
        pipe: an already loaded pipeline (else ``load_pipeline(config.model)``).

    Returns:
        every trace file of the run (sorted), then the report image (one per expert).
    """
    config = config.resolved()
    if pipe is None:
        pipe = load_pipeline(config.model, device=config.device, dtype=getattr(torch, config.dtype))
    call = PipelineCall.of(pipe)
    config = config.for_pipeline(call)
    identity = config.identity()
    manifest = Manifest.open(config.out, run_id_of(identity), identity)
    pipe.set_progress_bar_config(disable=True)
    mode = resolve_mode(config.mode, pipe)
    _warn_off_workload(pipe, config)
    experts = get_adapter(pipe.transformer).experts(pipe)
    units = [(i, p, s) for i, p in enumerate(config.prompts) for s in config.seeds]
    todo = [u for u in units if not manifest.is_finished(unit_name(u[0], u[2]))]
    logger.info("profiling %d of %d (prompt, seed) units in %s mode", len(todo), len(units), mode)
    passes = 2 if mode == "sample" else 1
    static = ({n: _static_metadata(getattr(pipe, n), config, mode, call) for n in experts}
              if todo else {})
    index = read_index(config.out) if len(experts) > 1 else None
    with tqdm(total=len(todo) * config.steps * passes, desc="profile", unit="step",
              disable=not config.progress) as bar:
        for prompt_index, prompt, seed in todo:
            recorded, calls = _profile_unit(pipe, config, mode, prompt, seed, bar, experts)
            if len(experts) > 1:
                index = _same_index(config.out, index, ExpertIndex.from_calls(
                    calls, config.steps, pipe.config.boundary_ratio))
            sigmas = scheduler_sigmas(pipe.scheduler, config.steps)
            written = _write_unit(config, manifest.run_id, static, recorded, index, sigmas,
                                  prompt_index, seed)
            manifest.mark_finished(unit_name(prompt_index, seed), written)
    from ditplan.profiler.report import write_report

    folders = [config.out / n for n in experts] if len(experts) > 1 else [config.out]
    reports = [write_report(f, f / REPORT_NAME) for f in folders]
    files = sorted(config.out / f for unit in manifest.finished.values() for f in unit)
    return [*files, *reports]


def _warn_off_workload(pipe, config: ProfileConfig) -> None:
    """Log when a reference pipeline trained at another size (the long model) is profiled at
    the profiler's default size, which was most likely not asked for: its traces describe it."""
    from ditplan.reference.export import trained_preset
    from ditplan.reference.pipeline import ReferenceVideoPipeline

    if not isinstance(pipe, ReferenceVideoPipeline):
        return
    defaults = ProfileConfig(out=config.out)
    clip = trained_preset(pipe).clip
    trained = (clip.frames, clip.height, clip.width)
    asked = (config.frames, config.height, config.width)
    if asked == (DEFAULT_FRAMES, defaults.height, defaults.width) and asked != trained:
        logger.warning("profiling at the default %d frames x %d x %d px; this model was trained "
                       "at %d x %d x %d (pass --frames %d --height %d --width %d for its own "
                       "workload)", *asked, *trained, *trained)


def _same_index(out: Path, index: ExpertIndex | None, found: ExpertIndex) -> ExpertIndex:
    """``found``, the expert index of this generation's calls; TraceError when an earlier
    generation of the folder switched experts at another step."""
    if index is not None and found != index:
        raise TraceError(f"the experts ran steps {found.step_ranges} in this generation but "
                         f"{index.step_ranges} in an earlier one of {out}: the pipeline's "
                         "boundary changed; profile into an empty folder")
    return found


def _write_unit(config: ProfileConfig, run_id: str, static: dict, recorded: dict,
                index: ExpertIndex | None, sigmas: tuple[float, ...] | None, prompt_index: int,
                seed: int) -> list[Path]:
    """Write one (prompt, seed)'s tables: into ``config.out``, or with an expert ``index`` into
    each expert's folder with its steps numbered from its first (and the index beside them),
    the generation's ``sigmas`` in the metadata. Nothing is written when an expert has no
    attention statistics."""
    ranges = {} if index is None else index.step_ranges
    tables = {e: build_tables(rows, run_id=run_id, prompt_index=prompt_index, seed=seed,
                              step_offset=ranges[e][0] if ranges else 0)
              for e, (rows, _) in recorded.items()}
    _check_attention(tables, ranges, config)
    if index is not None:
        write_index(config.out, index)
    written = []
    for expert, (_, recorder) in recorded.items():
        metadata = _metadata(run_id, static[expert], recorder, config, expert,
                             ranges.get(expert), sigmas)
        folder = config.out / expert if ranges else config.out
        written += write_unit(folder, unit_name(prompt_index, seed), tables[expert], metadata)
    return written


def _check_attention(tables: dict, ranges: dict[str, tuple[int, int]],
                     config: ProfileConfig) -> None:
    """Refuse an expert whose steps include no attention step (the compiler needs them)."""
    for expert, step_range in ranges.items():
        if not tables[expert]["attention_stats"].num_rows:
            raise ProfileConfigError(
                f"--attention-steps {list(config.attention_steps or ())} include none of "
                f"{expert}'s steps {list(range(*step_range))}: add at least one of them")


def _profile_unit(pipe, config: ProfileConfig, mode: str, prompt: str, seed: int, bar,
                  experts: list[str]):
    """Record one (prompt, seed): per expert its rows and recorder, and the step of each of
    its calls."""
    settings = config.recorder_settings()
    pipeline_call = PipelineCall.of(pipe)
    arguments = pipeline_call.arguments(
        prompt, steps=config.steps, height=config.height, width=config.width,
        frames=config.frames, guidance_scale=config.guidance_scale)
    call = dict(**arguments, output_type="latent", return_dict=False)
    if mode == "clip":
        mask, callbacks = _clip_inputs(pipe, config, prompt, seed, call)
    else:
        mask = generated_foreground(pipe, {**call, "generator": _generator(seed)},
                                    _chain([_progress(bar)]))
        callbacks, call["generator"] = [], _generator(seed)
    with ExitStack() as stack:
        recorders = {n: stack.enter_context(ProfileRecorder(getattr(pipe, n), settings,
                                                            config.steps)) for n in experts}
        calls = {n: _steps_of_calls(r, stack) for n, r in recorders.items()}
        for recorder in recorders.values():
            recorder.set_foreground(mask)
        pipeline_call.invoke(pipe, call, _chain([*callbacks, _progress(bar)]))
        return {n: (r.take_rows(), r) for n, r in recorders.items()}, calls


def _steps_of_calls(recorder: ProfileRecorder, stack: ExitStack) -> list[int]:
    """The step of each call of the recorder's transformer, appended as the calls finish."""
    steps: list[int] = []
    handle = recorder.transformer.register_forward_hook(
        lambda module, args, output: steps.append(recorder.call.step))
    stack.callback(handle.remove)
    return steps


def _clip_inputs(pipe, config: ProfileConfig, prompt: str, seed: int, call: dict):
    """Ground-truth mask [tokens] and the teacher-forcing callback; sets call['latents']."""
    from ditplan.reference.export import trained_preset

    device = pipe.transformer.device
    # the model's own training clips (the long model's speeds and backgrounds), at this size
    spec = replace(trained_preset(pipe).clip, frames=config.frames, height=config.height,
                   width=config.width)
    clip = clip_inputs.reference_clip(prompt, seed, spec, device)
    pipe.scheduler.set_timesteps(config.steps, device=device)
    forcing = clip_inputs.TeacherForcing(clip.video, seed, pipe.scheduler.sigmas)
    call["latents"] = forcing.latents_at(0)
    patch = tuple(pipe.transformer.config.patch_size)
    mask = foreground.pool_mask_to_tokens(clip.fg_mask[0].cpu(), patch)
    return mask, [forcing.callback()]


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)  # CPU: the same noise on every device


def _progress(bar) -> Callable:
    def on_step_end(pipe, step, timestep, tensors):
        bar.update()
        return {}

    return on_step_end


def _chain(callbacks: list[Callable]) -> Callable:
    def on_step_end(pipe, step, timestep, tensors):
        replaced = {}
        for callback in callbacks:
            replaced.update(callback(pipe, step, timestep, {**tensors, **replaced}))
        return replaced

    return on_step_end


def scheduler_sigmas(scheduler, steps: int) -> tuple[float, ...] | None:
    """The sigma of each of ``steps`` steps as the pipeline's last generation set its scheduler
    (pipelines pass their own sigmas: HunyuanVideo's and HV1.5's linear ones, FLUX.1's shifted
    by ``mu``), or None when the scheduler has no sigmas."""
    sigmas = getattr(scheduler, "sigmas", None)
    return None if sigmas is None else tuple(float(s) for s in sigmas[:steps])


def _static_metadata(transformer, config: ProfileConfig, mode: str, call: PipelineCall) -> dict:
    settings = config.recorder_settings().to_metadata()
    method = (foreground.GROUND_TRUTH_METHOD if mode == "clip"
              else foreground.ESTIMATE_METHOD)
    settings.update(mode=mode, foreground=method, dtype=config.dtype)
    return dict(fingerprint=ModelFingerprint(**model_fingerprint(transformer, with_weights=True)),
                settings=settings, versions=library_versions(),
                adapter=get_adapter(transformer), transformer=transformer,
                cfg=call.cfg(config.guidance_scale))


def _metadata(run_id: str, static: dict, recorder: ProfileRecorder, config: ProfileConfig,
              expert: str, step_range: tuple[int, int] | None,
              sigmas: tuple[float, ...] | None) -> TraceMetadata:
    """One transformer's trace metadata; an expert's covers its steps only (``step_range`` of
    the generation's, numbered from 0, and their ``sigmas``) and its settings name the expert
    and the range."""
    model = static["adapter"].model_config(static["transformer"], recorder.text_len)
    start, stop = step_range or (0, config.steps)
    settings = static["settings"]
    if step_range is not None:
        sigmas = None if sigmas is None else sigmas[start:stop]
        local = {k: None if settings[k] is None else
                 [s - start for s in settings[k] if start <= s < stop]
                 for k in ("map_steps", "attention_steps")}
        settings = {**settings, **local, "expert": expert, "step_range": [start, stop],
                    "generation_steps": config.steps}
    workload = Workload(steps=stop - start, height=config.height, width=config.width,
                        frames=config.frames, guidance_scale=config.guidance_scale,
                        cfg=static["cfg"], tokens_grid=recorder.layout.grid, sigmas=sigmas)
    return TraceMetadata(run_id=run_id, fingerprint=static["fingerprint"],
                         model_config=ModelConfig(**model), workload=workload,
                         profiler_settings=settings, library_versions=static["versions"])


def profile_transformer_calls(
    transformer, inputs: dict, *, steps: int, settings: RecorderSettings,
    contexts: tuple[str, ...] = ("cond",), foreground_mask: torch.Tensor | None = None,
) -> TraceRows:
    """Profile a transformer on fixed inputs for ``steps`` steps, without a pipeline.

    For overhead benchmarks: each step calls ``transformer(**inputs)`` once per CFG context
    under ``cache_context(context, step_index=step)``.

    Args:
        transformer: a supported transformer (get_adapter).
        inputs: its forward keyword arguments (hidden_states [B, C, F, H, W], timestep, ...).
        steps: how many steps to run.
        settings: RecorderSettings.
        contexts: CFG contexts per step ("cond", "uncond").
        foreground_mask: bool [F*H*W] video tokens, or None (no foreground).

    Returns:
        the recorded TraceRows (``.columns()`` gives the tables' columns).
    """
    with ProfileRecorder(transformer, settings, steps) as recorder, torch.no_grad():
        recorder.set_foreground(foreground_mask)
        for step in range(steps):
            for context in contexts:
                with transformer.cache_context(context, step_index=step,
                                               num_inference_steps=steps):
                    transformer(**inputs, return_dict=False)
        return recorder.take_rows()
