"""``compile-policy --calibrate``: measure candidate plans' speed and PSNR against dense output
(a two-expert plan file is measured as one candidate: both experts run their sections)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ditplan.policy.experts import ExpertPlans, execution_dict
from ditplan.policy.plan import IDENTICAL_PSNR_DB, Calibration, Plan
from ditplan.runtime.experts import apply_any_plan
from ditplan.runtime.loading import load_pipeline
from ditplan.runtime.run import generate_samples
from ditplan.runtime.video_metrics import compare_videos

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class CalibrationSetup:
    """Where and on what candidates are measured.

    prompts x seeds (never the evaluation captions) are generated ``batch`` samples at a time
    per measurement (None: all in one batch); speed depends on the batch, so calibrate at the
    one you will run (``ditplan run``: 1). ``warmup`` untimed generations precede the
    ``repeats`` timed ones, whose median time counts (GPU: kernel compilation, allocator; a
    busy CPU: repeats smooth its noise);
    ``record`` is a JSONL file of finished measurements, so an interrupted calibration resumes.
    """

    model: str
    prompts: tuple[str, ...]
    device: str
    record: Path
    seeds: tuple[int, ...] = (0,)
    backend: str = "auto"
    warmup: int = 0
    repeats: int = 1
    batch: int | None = None

    def __post_init__(self):
        if not self.prompts or not self.seeds:
            raise ValueError("calibration needs at least one prompt and one seed: pass "
                             "--calibration-prompts (the traces record no profiling prompts)")
        if self.warmup < 0 or self.repeats < 1:
            raise ValueError(f"need warmup >= 0 and repeats >= 1, got {self.warmup}, "
                             f"{self.repeats}")
        if self.batch is not None and self.batch < 1:
            raise ValueError(f"--calibration-batch must be at least 1, got {self.batch}")

    @property
    def samples(self) -> list[tuple[str, int]]:
        """Every (prompt, seed), in generation order."""
        return [(p, s) for p in self.prompts for s in self.seeds]

    @property
    def per_call(self) -> int:
        """Samples per generation call: ``batch``, else every prompt x seed at once."""
        return self.batch or len(self.prompts) * len(self.seeds)


def generate_batch(pipe, setup: CalibrationSetup, plan: Plan | ExpertPlans
                   ) -> tuple[list[torch.Tensor], float]:
    """Every prompt x seed in calls of at most ``setup.batch`` samples (None: one call) at the
    plan's workload (expert plans: the generation both experts run): frames [F, H, W, 3] per
    sample in sample order (CPU, in [0, 1]) and the wall seconds summed over the calls."""
    samples, size = setup.samples, setup.per_call
    frames, seconds = [], 0.0
    for start in range(0, len(samples), size):
        chunk = samples[start:start + size]
        chunk_frames, chunk_s = generate_samples(pipe, [p for p, _ in chunk],
                                                 [s for _, s in chunk], plan.workload,
                                                 setup.device)
        frames += chunk_frames
        seconds += chunk_s
    return frames, seconds


def timed(pipe, setup: CalibrationSetup, plan: Plan | ExpertPlans
          ) -> tuple[list[torch.Tensor], float]:
    """``setup.warmup`` untimed generations, then ``setup.repeats`` timed ones: the last one's
    frames and the median seconds."""
    for _ in range(setup.warmup):
        generate_batch(pipe, setup, plan)
    runs = [generate_batch(pipe, setup, plan) for _ in range(setup.repeats)]
    return runs[-1][0], statistics.median(seconds for _, seconds in runs)


def candidate_key(plan: Plan | ExpertPlans, setup: CalibrationSetup) -> str:
    """Identifies a measurement: the plan's execution (not its provenance; expert plans: the
    whole file's, without any section's provenance) and the setup."""
    body = execution_dict(plan)
    where = (setup.model, setup.prompts, setup.seeds, setup.device, setup.backend)
    if setup.repeats > 1:  # keys of single-run measurements stay as they were
        where += (setup.repeats,)
    if setup.batch is not None:  # named: a bare number would read as the repeats
        where += (("batch", setup.batch),)
    text = json.dumps([body, where], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _read_record(path: Path) -> dict[str, dict]:
    if not path.is_file():
        return {}
    done = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        try:
            row = json.loads(line)
            done[row["key"]] = row["calibration"]
        except (ValueError, KeyError, TypeError):
            logger.warning("%s:%d is not a calibration row; measured again", path, number)
    return done


def _append(path: Path, row: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as f:  # one whole line per finished candidate
        f.write(json.dumps(row, sort_keys=True) + "\n")


def similarity(frames: Sequence[torch.Tensor], dense: Sequence[torch.Tensor]) -> tuple[float,
                                                                                         float]:
    """Mean PSNR (capped at IDENTICAL_PSNR_DB) and mean cosine of each sample against dense."""
    scores = [compare_videos(a, b) for a, b in zip(frames, dense, strict=True)]
    psnr = statistics.fmean(min(s["psnr_db"], IDENTICAL_PSNR_DB) for s in scores)
    return psnr, statistics.fmean(s["cosine"] for s in scores)


class Calibrator:
    """Measures plans on one loaded pipeline; call it with the candidate plans (one workload),
    or with expert plans for a two-expert pipeline (each measured end to end)."""

    def __init__(self, setup: CalibrationSetup, pipe=None):
        self.setup = setup
        self.pipe = pipe if pipe is not None else load_pipeline(setup.model, device=setup.device)
        self.pipe.set_progress_bar_config(disable=True)
        self._dense_frames: list[torch.Tensor] | None = None
        self._dense_s: dict[int, float] = {}  # timed repeats -> median dense seconds
        self._weights_checked: set[tuple] = set()  # identities whose weights match the pipe's

    def __call__(self, plans: Sequence[Plan] | Sequence[ExpertPlans], repeats: int | None = None
                 ) -> list[Calibration]:
        """One Calibration per plan (resumed from the record where measured before);
        ``repeats`` times each over that many batches instead of the setup's."""
        if len({p.workload for p in plans}) > 1:
            raise ValueError("calibration candidates must share one workload")
        setup = self.setup if repeats is None else dataclasses.replace(self.setup,
                                                                       repeats=repeats)
        done = _read_record(setup.record)
        out = []
        for plan in tqdm(plans, desc="calibrating" if repeats is None else "timing again",
                         unit="plan"):
            key = candidate_key(plan, setup)
            if key not in done:
                done[key] = asdict(self.measure(plan, len(plans), setup))
                _append(self.setup.record, {"key": key, "calibration": done[key],
                                            "design": _design(plan)})
            out.append(Calibration(**{"batch": self.setup.per_call, **done[key],
                                      "candidates": len(plans)}))
        return out

    def dense(self, plan: Plan | ExpertPlans, setup: CalibrationSetup | None = None
              ) -> tuple[list[torch.Tensor], float]:
        """Dense frames and seconds at the plan's workload, measured once per calibrator and
        number of timed repeats (a re-timing compares medians over as many batches)."""
        setup = setup or self.setup
        if self._dense_frames is None:
            generate_batch(self.pipe, self.setup, plan)  # the pipeline's first call is cold
            self._dense_frames, self._dense_s[self.setup.repeats] = timed(self.pipe, self.setup,
                                                                          plan)
        if setup.repeats not in self._dense_s:
            self._dense_s[setup.repeats] = timed(self.pipe, setup, plan)[1]
        return self._dense_frames, self._dense_s[setup.repeats]

    def measure(self, plan: Plan | ExpertPlans, candidates: int,
                setup: CalibrationSetup | None = None) -> Calibration:
        """One candidate: apply, generate (timed as ``setup`` says, default the calibrator's),
        remove; compare with dense. The weights are hashed against the plan's identity once
        per identity (a 14B expert takes a while to hash, and the pipeline does not change)."""
        setup = setup or self.setup
        dense_frames, dense_s = self.dense(plan, setup)
        identity = _identities(plan)
        handle = apply_any_plan(self.pipe, plan, backend=setup.backend,
                                check_weights=identity not in self._weights_checked)
        self._weights_checked.add(identity)
        try:
            frames, plan_s = timed(self.pipe, setup, plan)
        finally:
            handle.remove()
        psnr, cosine = similarity(frames, dense_frames)
        name = (torch.cuda.get_device_name() if torch.device(self.setup.device).type == "cuda"
                else self.setup.device)
        return Calibration(device=name, prompts=len(self.setup.prompts), speedup=dense_s / plan_s,
                           psnr_db=psnr, cosine=cosine, dense_s=dense_s, plan_s=plan_s,
                           candidates=candidates, batch=self.setup.per_call)


def _sections(plan: Plan | ExpertPlans) -> tuple[Plan, ...]:
    """The plan of each transformer the plan runs, in section order."""
    return tuple(plan.experts.values()) if isinstance(plan, ExpertPlans) else (plan,)


def _identities(plan: Plan | ExpertPlans) -> tuple:
    """The model identity of each transformer the plan runs, in section order."""
    return tuple(section.identity for section in _sections(plan))


def _design(plan: Plan | ExpertPlans) -> str:
    """The compiler's name for the plan's design (expert plans: each section's, "a | b")."""
    return " | ".join(p.provenance.compiler_settings.get("design", "") for p in _sections(plan))
