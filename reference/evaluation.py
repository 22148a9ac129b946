"""Held-out evaluation of the reference model: generate the 64 held-out captions, score the pixels,
score the data clips of the same captions as the baseline, write JSON and a sample grid PNG."""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ditplan.reference.attributes import SpriteAttributes, captions_for, heldout_attributes
from ditplan.reference.clips import ClipSpec, render_clips
from ditplan.reference.pipeline import ReferenceVideoPipeline
from ditplan.reference.scoring import aligned_by_attribute, score_clips, summarize, to_frames

logger = logging.getLogger(__name__)

RESULTS_FILE = "eval_results.json"
GRID_FILE = "sample_grid.png"


def eval_clip(spec: ClipSpec) -> ClipSpec:
    """A preset's training clips as the evaluation draws them: no bounces, so the captioned
    direction holds for the whole clip."""
    return replace(spec, bounce_prob=0.0)


@dataclass
class EvalSettings:
    """Sampling settings of one evaluation (one entry per guidance scale is produced)."""

    steps: int = 32
    guidance_scales: tuple[float, ...] = (4.0,)
    batch_size: int = 16
    seed: int = 0
    limit: int | None = None  # first N held-out captions only (smoke tests)
    clip: ClipSpec = eval_clip(ClipSpec())  # the reference workload: 16 x 48 x 48, no bounces


def _slice(attributes: SpriteAttributes, count: int) -> SpriteAttributes:
    return SpriteAttributes(**{k: v[:count] for k, v in vars(attributes).items()})


def generate(pipe: ReferenceVideoPipeline, captions: list[str], guidance: float,
             settings: EvalSettings) -> torch.Tensor:
    """Samples one video per caption; caption i always uses noise seed settings.seed + i.

    Returns:
        float [N, F, H, W, 3] in [0, 1] on the CPU.
    """
    device = pipe._execution_device
    out = []
    for start in range(0, len(captions), settings.batch_size):
        chunk = captions[start:start + settings.batch_size]
        gens = [torch.Generator(device).manual_seed(settings.seed + start + i)
                for i in range(len(chunk))]
        frames = pipe(chunk, num_inference_steps=settings.steps, guidance_scale=guidance,
                      num_frames=settings.clip.frames, height=settings.clip.height,
                      width=settings.clip.width, generator=gens, output_type="pt").frames
        out.append(frames.float().cpu())
    return torch.cat(out)


def sample_grid(rows: list[torch.Tensor], frames_shown: int = 8, zoom: int = 2) -> Image.Image:
    """Tiles videos, one per row, showing `frames_shown` evenly spaced frames.

    Args:
        rows: each float [F, H, W, 3] in [0, 1].

    Returns:
        an RGB image of len(rows) x frames_shown tiles, magnified `zoom` times.
    """
    picks = np.linspace(0, rows[0].shape[0] - 1, frames_shown).round().astype(int)
    tiles = [torch.cat([video[int(f)] for f in picks], dim=1) for video in rows]  # [H, W*k, 3]
    grid = (torch.cat(tiles, dim=0).clamp(0, 1) * 255).round().byte().numpy()
    image = Image.fromarray(grid)
    return image.resize((image.width * zoom, image.height * zoom), Image.NEAREST)


def _finite(value):
    """JSON-safe: NaN/inf -> None, recursively."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def _write_atomic(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def evaluate(pipe: ReferenceVideoPipeline, out_dir: str | Path, settings: EvalSettings) -> dict:
    """Runs the held-out evaluation and writes eval_results.json and sample_grid.png.

    The grid shows the first 8 held-out captions, a data clip row above each sample row, for the
    first guidance scale.

    Returns:
        the results dict that was written.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    attributes = heldout_attributes()
    if settings.limit is not None:
        attributes = _slice(attributes, settings.limit)
    captions = captions_for(attributes)
    data = to_frames(render_clips(attributes, torch.Generator().manual_seed(settings.seed),
                                  settings.clip).video)
    began = time.perf_counter()
    data_scores = score_clips(data, attributes)
    logger.info("data: %d clips scored in %.1f s", len(data_scores), time.perf_counter() - began)
    results = {"workload": asdict(settings.clip), "steps": settings.steps,
               "data": summarize(data_scores), "by_guidance": {},
               "captions": captions, "grid_rows": "data, sample for each of the first 8 captions",
               "attention_concentration": "not measured here: needs ditplan.runtime.kernels"}
    for guidance in settings.guidance_scales:
        began = time.perf_counter()
        samples = generate(pipe, captions, guidance, settings)
        seconds = time.perf_counter() - began
        began = time.perf_counter()
        scores = score_clips(samples, attributes)
        scoring = time.perf_counter() - began
        logger.info("guidance %.1f: generated in %.1f s, scored in %.1f s", guidance, seconds,
                    scoring)
        summary = summarize(scores)
        results["by_guidance"][str(guidance)] = {
            "samples": summary, "generation_seconds": seconds, "scoring_seconds": scoring,
            "direction_aligned_by": aligned_by_attribute(scores, attributes),
            "per_clip": [asdict(s) for s in scores]}
        logger.info("guidance %.1f: %s", guidance, summary)
        if guidance == settings.guidance_scales[0]:
            rows = [v for i in range(min(8, len(captions))) for v in (data[i], samples[i])]
            _write_atomic(out / GRID_FILE, lambda p, r=rows: sample_grid(r).save(p, format="PNG"))
    results = _finite(results)
    _write_atomic(out / RESULTS_FILE, lambda p: p.write_text(json.dumps(results, indent=1)))
    return results


def eval_settings(**overrides) -> EvalSettings:
    """EvalSettings with overrides; `frames`, `height`, `width` change the clip size."""
    size = {k: overrides.pop(k) for k in ("frames", "height", "width") if k in overrides}
    settings = EvalSettings(**overrides)
    return replace(settings, clip=replace(settings.clip, **size)) if size else settings
