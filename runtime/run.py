"""``ditplan run``: generate with a plan (or dense), time it, optionally compare with dense."""

from __future__ import annotations

import logging
import resource
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from ditplan.policy.experts import ExpertPlans, load_any_plan
from ditplan.policy.plan import Plan, PlanError
from ditplan.runtime.apply import compile_blocks, enable_parallel
from ditplan.runtime.experts import apply_any_plan
from ditplan.runtime.launch import Launch
from ditplan.runtime.loading import REFERENCE, load_pipeline
from ditplan.runtime.outputs import (
    to_uint8,
    write_contact_sheet,
    write_image,
    write_json,
    write_video,
)
from ditplan.runtime.pipeline_calls import PipelineCall
from ditplan.runtime.video_metrics import compare_videos

logger = logging.getLogger(__name__)

# Built-in reference model defaults: small enough for a 2-core CPU (see README).
REFERENCE_DEFAULTS = dict(steps=16, height=32, width=32, frames=8, guidance_scale=4.0)
REFERENCE_PROMPT = "a red circle slowly moves right"
# What ``ditplan run`` writes: a video pipeline's generation, an image pipeline's.
VIDEO_NAME, IMAGE_NAME = "video.mp4", "image.png"
# Untimed generations before timing each side of --compare-dense (dense, then the applied plan).
COMPARE_WARMUP_RUNS = 1
# Compiled blocks compile every graph in their first generation: the second compiles nothing
# (measured on an H200 for dense and three plans, and in tests/runtime/test_compiled_blocks.py).
COMPILE_WARMUP_RUNS = 1


@dataclass
class RunConfig:
    """Arguments of one ``ditplan run``; None means: the plan's workload, else the defaults."""

    out: Path
    model: str = REFERENCE
    plan: Path | None = None
    prompt: str | None = None
    seed: int = 0
    steps: int | None = None
    height: int | None = None
    width: int | None = None
    frames: int | None = None
    guidance_scale: float | None = None
    device: str = "cpu"
    backend: str = "auto"
    compare_dense: bool = False
    repeats: int = 1  # timed generations of each kind; medians are reported
    compile: bool | dict = False  # compile each transformer block (torch.compile options)


def resolve_workload(config: RunConfig, plan: Plan | ExpertPlans | None,
                     call: PipelineCall) -> dict:
    """Generation settings: explicit flags, else the plan's workload, else the model defaults.

    A flag that contradicts the plan's workload is refused: plans are per workload. An image
    pipeline (``call``) generates one frame; ``--frames`` is refused for it.
    """
    call.frames(config.frames)  # refuses --frames N on an image pipeline
    given = dict(
        steps=config.steps,
        height=config.height,
        width=config.width,
        frames=config.frames,
        guidance_scale=config.guidance_scale,
    )
    if plan is None:
        defaults = REFERENCE_DEFAULTS if config.model == REFERENCE else {}
        if not call.video:
            defaults = {**defaults, "frames": 1}
        missing = [k for k, v in given.items() if v is None and k not in defaults]
        if missing:
            raise ValueError(
                f"--{missing[0].replace('_', '-')} is required for --model {config.model}"
            )
        return {k: defaults[k] if v is None else v for k, v in given.items()}
    planned = {k: getattr(plan.workload, k) for k in given}
    clash = {k: (v, planned[k]) for k, v in given.items() if v is not None and v != planned[k]}
    if clash:
        said = ", ".join(f"--{k.replace('_', '-')} {a} (plan: {b})" for k, (a, b) in clash.items())
        raise PlanError(
            f"the plan was compiled for another workload: {said}. Drop those flags to use the "
            "plan's workload, or profile and compile a plan for this one"
        )
    return planned


def output_name(call: PipelineCall, frames: int) -> str:
    """The file ``run_generation`` writes the generation to (a one-frame video is a PNG)."""
    if not call.video:
        return IMAGE_NAME
    return VIDEO_NAME if frames > 1 else str(Path(VIDEO_NAME).with_suffix(".png"))


def synchronize(device: str) -> None:
    """Wait for the device's queued work (a no-op off CUDA), so wall-clock timings are whole."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def generate_samples(pipe, prompts: Sequence[str], seeds: Sequence[int], work,
                     device: str) -> tuple[list[torch.Tensor], float]:
    """Prompt i with noise seed i, all in one batched call, timed.

    Args:
        work: the generation settings (``steps``, ``guidance_scale``, ``frames``, ``height``,
            ``width``: a plan's or a benchmark's workload).
    Returns:
        frames float [F, H, W, 3] in [0, 1] on the CPU, one per sample (F = 1 for an image);
        and the wall seconds.
    """
    call = PipelineCall.of(pipe)
    generators = [torch.Generator().manual_seed(s) for s in seeds]  # CPU noise on every device
    arguments = call.arguments(list(prompts), steps=work.steps, height=work.height,
                               width=work.width, frames=work.frames,
                               guidance_scale=work.guidance_scale)
    synchronize(device)
    start = time.perf_counter()
    output = call.invoke(pipe, arguments, generator=generators, output_type="np")
    synchronize(device)
    seconds = time.perf_counter() - start
    frames = call.samples(output)  # [N, F, H, W, 3]
    return [torch.from_numpy(np.array(f, dtype=np.float32)) for f in frames], seconds


def generate(pipe, config: RunConfig, workload: dict) -> tuple[np.ndarray, dict]:
    """One generation; returns uint8 frames [F, H, W, 3] (F = 1 for an image) and its
    timings."""
    call = PipelineCall.of(pipe)
    step_times: list[float] = []

    def on_step_end(pipeline, step, timestep, tensors):
        synchronize(config.device)
        step_times.append(time.perf_counter())
        return {}

    generator = torch.Generator(device="cpu").manual_seed(config.seed)
    synchronize(config.device)
    start = time.perf_counter()
    output = call.invoke(pipe, call.arguments(config.prompt or REFERENCE_PROMPT, **workload),
                         on_step_end, generator=generator, output_type="np")
    synchronize(config.device)
    wall = time.perf_counter() - start
    per_step = np.diff([start, *step_times]) if step_times else np.array([wall])
    frames = to_uint8(call.samples(output)[0])
    return frames, {"wall_s": wall, "step_s_median": float(np.median(per_step))}


def timed_generations(
    pipe, config: RunConfig, workload: dict, warmup: int = 0
) -> tuple[np.ndarray, dict]:
    """``warmup`` untimed generations, then ``config.repeats`` timed ones with one seed; frames
    of the last, median timings.

    The first generation of a model, and the first after a plan is applied, pays for warm-up
    (allocator growth, kernel selection and compilation, lazy initialisation); comparisons warm
    each side up so neither is timed cold. Peak memory covers all of them.
    """
    _reset_peak(config.device)
    for _ in range(warmup):
        generate(pipe, config, workload)
    runs = [generate(pipe, config, workload) for _ in range(config.repeats)]
    frames = runs[-1][0]
    walls = [timing["wall_s"] for _, timing in runs]
    timings = {
        "wall_s": float(np.median(walls)),
        "step_s_median": float(np.median([timing["step_s_median"] for _, timing in runs])),
        "wall_s_runs": walls,
        "warmup_runs": warmup,
    }
    timings.update(_peak_memory(config.device))
    return frames, timings


def _peak_memory(device: str) -> dict:
    if torch.device(device).type == "cuda":
        return {"peak_gpu_memory_gib": torch.cuda.max_memory_allocated() / 2**30}
    return {"peak_host_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def _reset_peak(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats()


def run_generation(config: RunConfig, launch: Launch | None = None) -> dict:
    """Generate one video or image with ``config.plan`` applied; write it and the metrics
    (``metrics["output"]`` names the file: video.mp4 with a contact sheet, or image.png).

    Under a torchrun ``launch`` every rank runs this with the same seed, the transformer runs
    context-parallel over the ranks (Ulysses) and rank 0 alone writes the files. The plan's
    generations come first and dense (``--compare-dense``) second, after ``remove()``: a
    parallel model takes no plan afterwards.
    """
    plan = load_any_plan(config.plan) if config.plan else None  # a plan file per expert too
    pipe = load_pipeline(config.model, device=config.device)
    call = PipelineCall.of(pipe)
    workload = resolve_workload(config, plan, call)
    metrics: dict = {"config": {k: str(v) for k, v in asdict(config).items()}, "workload": workload,
                     "output": output_name(call, workload["frames"])}
    parallel = None
    if launch is not None:
        from diffusers import ContextParallelConfig

        parallel = ContextParallelConfig(ulysses_degree=launch.world)
        metrics["parallel"] = {"ranks": launch.world, "ulysses_degree": launch.world}
        pipe.set_progress_bar_config(disable=not launch.writes_outputs)
    warmup = COMPARE_WARMUP_RUNS if config.compare_dense else 0
    if config.compile:
        warmup = max(warmup, COMPILE_WARMUP_RUNS)
    handle = (apply_any_plan(pipe, plan, backend=config.backend, parallel=parallel,
                             compile=config.compile) if plan else None)
    compiled = compile_blocks(pipe, config.compile) if config.compile and not plan else None
    if handle is None and parallel is not None:
        enable_parallel(pipe, parallel)
    frames, metrics["run"] = timed_generations(pipe, config, workload, warmup)
    if handle:
        metrics["run"].update(handle.stats())  # under a launch, a collective of all ranks
        handle.remove()
    dense = None
    if config.compare_dense:
        if config.compile and compiled is None:
            torch._dynamo.reset()  # the plan's graphs: dense starts afresh (a fair warm-up)
            compiled = compile_blocks(pipe, config.compile)
        dense, metrics["dense"] = timed_generations(pipe, config, workload, warmup)
    if compiled is not None:
        compiled.remove()
    if launch is not None and not launch.writes_outputs:
        return metrics
    if dense is not None:
        metrics["speedup_vs_dense"] = metrics["dense"]["wall_s"] / metrics["run"]["wall_s"]
        metrics["step_speedup_vs_dense"] = (
            metrics["dense"]["step_s_median"] / metrics["run"]["step_s_median"]
        )
        metrics["vs_dense"] = compare_videos(
            torch.from_numpy(frames) / 255.0, torch.from_numpy(dense) / 255.0
        )
    if not call.video:
        write_json(config.out / "metrics.json", metrics)
        write_image(config.out / IMAGE_NAME, frames[0])
        if dense is not None:
            write_image(config.out / f"dense_{IMAGE_NAME}", dense[0])
        return metrics
    if dense is not None:
        write_contact_sheet(config.out / "dense_frames.png", dense)
    write_contact_sheet(config.out / "frames.png", frames)
    write_json(config.out / "metrics.json", metrics)  # before the video: kept if ffmpeg fails
    write_video(config.out / VIDEO_NAME, frames)
    return metrics
