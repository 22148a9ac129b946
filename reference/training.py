"""Rectified-flow training of the reference DiT on procedurally generated clips, resumable.

Data are generated on the training device every step from a seed derived from (run seed, global
step), and the clip size of a step comes from the run's curriculum, so a resumed run sees exactly
the batches an uninterrupted one would. Checkpoints hold the weights in their shipped dtypes,
AdamW's second moment in bf16 unless the checkpoint is lean (see `Trainer.checkpoint` for why),
the step, the loss curve and the hyperparameters. A run can also resume from an exported
pipeline folder (weights + training_state.json + loss.csv, no optimizer state), or a lean
checkpoint: AdamW then restarts from zero moments and the learning rate re-warms (see
`learning_rate`). A fine-tune starts from another model's weights (`TrainConfig.init`, e.g. the
long preset from the shipped reference export) at step 0 with its own schedule and loss curve.
Under data parallelism (`Shard`) every process generates the whole batch of a step and trains on
its slice, the gradients are averaged over the processes, and only the first one writes, so a
run on W GPUs is the single-process run up to float rounding.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from ditplan.reference.checkpoint import (
    Checkpoint,
    CheckpointError,
    is_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from ditplan.reference.clips import ClipSpec, generate_clips
from ditplan.reference.concentration import TILE as CONCENTRATION_TILE
from ditplan.reference.concentration import ConcentrationPenalty
from ditplan.reference.config import (
    ModelPreset,
    build_caption_encoder,
    build_transformer,
    get_preset,
)
from ditplan.reference.curriculum import check_patch, clip_spec_at, parse_curriculum
from ditplan.reference.export import (
    MODEL_INDEX_FILE,
    export_pipeline,
    load_export,
    shipped_dtypes,
)
from ditplan.reference.flow import (
    NUM_TRAIN_TIMESTEPS,
    noisy_sample,
    sample_sigmas,
    velocity_target,
)

logger = logging.getLogger(__name__)

LOSS_HEADER = "step,train_seconds,loss,lr,grad_norm,clips_per_s,top_block_mass\n"
# loss.csv before the concentration penalty's column (session 19); resumed curves gain it, empty
_LOSS_HEADER_BEFORE_MASS = "step,train_seconds,loss,lr,grad_norm,clips_per_s\n"
CHECKPOINT_DIR = "checkpoint"
MOMENT_PREFIX = "adam_exp_avg_sq."
_AUX_SEED_OFFSET = 1 << 40  # separates the noise/dropout stream from the clip stream


class ResumeMismatchError(ValueError):
    """The checkpoint was trained with another model preset."""


@dataclass
class TrainConfig:
    """Hyperparameters and run control. `total_steps` is the cosine horizon over all runs."""

    out: Path
    preset: str = "reference"
    resume: Path | None = None
    init: Path | None = None  # fine-tune: start from these weights at step 0 (unless resuming)
    export: Path | None = None
    batch_size: int = 32
    lr: float = 5e-4
    min_lr_ratio: float = 0.1
    warmup_steps: int = 200
    total_steps: int = 4000
    rewarm_steps: int = 100  # lr ramp after an optimizer restart (resume from an export)
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    caption_dropout: float = 0.1
    uniform_sigma_fraction: float = 0.1
    # Loss weight of the sprites' pixels (the background's is 1): their motion is a few % of the
    # pixels, so the plain mean squared error is mostly static background (1.0: plain MSE).
    foreground_weight: float = 1.0
    # Weight of the attention-concentration penalty (reference/concentration.py; 0: off) and the
    # top-20% key-block mass it pushes each layer's sampled query blocks up to.
    concentration_weight: float = 0.0
    concentration_target: float = 0.9
    concentration_over: str = "heads"  # the target per head, or per layer (mean of its heads)
    concentration_tile: tuple[int, int, int] = CONCENTRATION_TILE  # key blocks' token tiles
    max_steps: int | None = None  # steps in this run; None = until the time budget
    stop_step: int | None = None  # global step at which training ends, over all runs
    time_budget_min: float | None = None  # wall clock of this run, counted from `started_at`
    reserve_s: float = 15.0  # kept free at the end of the budget for the final save/export
    log_every: int = 25
    save_every: int = 500
    seed: int = 0
    # Frames per training clip instead of the preset's (same size and speeds per frame): a
    # curriculum stage on short clips costs ~4x less attention per clip at half the frames.
    clip_frames: int | None = None
    # Clip sizes by global step, 'FxHxW:STEP,...' (see curriculum.parse_curriculum); after the
    # last stage, the preset's clips (with clip_frames).
    curriculum: str | None = None
    # Checkpoints without AdamW state (weights only, ~20 MB for the reference architecture), so a
    # device call carries less; each resume then restarts AdamW and re-warms the lr.
    lean_checkpoint: bool = False
    compile: bool = True
    device: str | None = None  # default: cuda if available, else cpu


@dataclass(frozen=True)
class Shard:
    """This process's share of each batch under data parallelism: rank of world processes."""

    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        """The process that writes checkpoints, exports and the log."""
        return self.rank == 0

    def share(self, batch_size: int) -> int:
        """Samples per process of a global batch of `batch_size`.

        Raises:
            ValueError: if `batch_size` does not split evenly over the processes.
        """
        if batch_size % self.world:
            raise ValueError(f"--batch-size {batch_size} does not split evenly over {self.world} "
                             f"data-parallel processes: pass a multiple of {self.world}")
        return batch_size // self.world

    def take(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's contiguous slice of dim 0: [B, ...] -> [B / world, ...]."""
        n = self.share(x.shape[0])
        return x[self.rank * n:(self.rank + 1) * n]


def weighted_mse(pred: torch.Tensor, target: torch.Tensor, fg_mask: torch.Tensor,
                 foreground_weight: float) -> torch.Tensor:
    """Mean squared error with the sprites' pixels weighted `foreground_weight` (the rest 1).

    Args:
        pred, target: [B, C, F, H, W]; fg_mask: bool [B, F, H, W], the sprites' pixels.

    The mean is over all elements, not normalised by the weights, so equal shards of a batch
    average to the whole batch's loss (data parallelism stays the single-GPU run); at weight 1
    it is ``F.mse_loss``.
    """
    if foreground_weight == 1.0:
        return F.mse_loss(pred, target)
    weight = 1.0 + (foreground_weight - 1.0) * fg_mask[:, None].to(pred.dtype)  # [B, 1, F, H, W]
    return (weight * (pred - target).square()).mean()


def learning_rate(config: TrainConfig, step: int, restarted_at: int | None = None) -> float:
    """The learning rate of (0-based) `step`.

    Linear warmup to config.lr, cosine decay to lr * min_lr_ratio at total_steps, then flat.
    If the optimizer restarted (fresh AdamW moments) at step `restarted_at`, that schedule is
    scaled by (step - restarted_at + 1) / rewarm_steps for the rewarm_steps steps from there:
    Adam's first updates with fresh moments are about lr-sized per weight whatever the gradient,
    which at the full learning rate would undo part of the training (cf. the original warmup).
    """
    lr = _cosine_schedule(config, step)
    if restarted_at is not None and restarted_at <= step < restarted_at + config.rewarm_steps:
        lr *= (step - restarted_at + 1) / config.rewarm_steps
    return lr


def _cosine_schedule(config: TrainConfig, step: int) -> float:
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    span = max(1, config.total_steps - config.warmup_steps)
    progress = min(1.0, (step - config.warmup_steps) / span)
    floor = config.lr * config.min_lr_ratio
    return floor + (config.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


class Trainer:
    """Owns the models, optimizer, step counter and loss curve of one training process (one
    `shard` of a data-parallel run: all processes load the same weights and take the same steps).
    """

    def __init__(self, config: TrainConfig, started_at: float | None = None,
                 shard: Shard = Shard()):
        shard.share(config.batch_size)  # refuses a batch that does not split evenly
        self.config = config
        self.shard = shard
        self.started_at = time.monotonic() if started_at is None else started_at
        default = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(config.device or default)
        self.preset: ModelPreset = get_preset(config.preset)
        self.clip_spec = self.preset.clip
        if config.clip_frames is not None:
            self.clip_spec = dataclasses.replace(self.clip_spec, frames=config.clip_frames)
        self.stages = parse_curriculum(config.curriculum)
        check_patch(self.stages, tuple(self.preset.transformer["patch_size"]))
        self._logged_spec = None  # the clip spec last announced in the log
        torch.manual_seed(config.seed)  # parameter init only; data use explicit generators
        self.transformer = build_transformer(self.preset).to(self.device).train()
        self.text_encoder = build_caption_encoder(self.preset).to(self.device).train()
        self.named_params = [
            *((f"transformer.{n}", p) for n, p in self.transformer.named_parameters()),
            *((f"text_encoder.{n}", p) for n, p in self.text_encoder.named_parameters()),
        ]
        self.optimizer = self._make_optimizer()
        self.step = 0
        self.train_seconds = 0.0
        self.restarted_at: int | None = None  # step at which AdamW last restarted from zero
        self.initialised_from: dict | None = None  # the fine-tune's source model, if any
        self.resumed_state: dict | None = None  # the resume source's training record
        self.loss_csv = LOSS_HEADER
        self.concentration = None
        if config.concentration_weight > 0:  # its probes must be in place before compiling
            self.concentration = ConcentrationPenalty(self.transformer,
                                                      target=config.concentration_target,
                                                      over=config.concentration_over,
                                                      tile=tuple(config.concentration_tile))
        self.model = self.transformer
        if config.compile:  # static shapes: a curriculum stage recompiles, specialised again
            self.model = torch.compile(self.transformer, dynamic=False)
        self.amp = self.device.type == "cuda"

    def _make_optimizer(self) -> torch.optim.AdamW:
        decay = [p for _, p in self.named_params if p.ndim >= 2]
        no_decay = [p for _, p in self.named_params if p.ndim < 2]
        groups = [{"params": decay, "weight_decay": self.config.weight_decay},
                  {"params": no_decay, "weight_decay": 0.0}]
        return torch.optim.AdamW(groups, lr=self.config.lr, betas=(0.9, 0.99), eps=1e-8,
                                 fused=self.device.type == "cuda")

    def checkpoint(self) -> Checkpoint:
        """The training state, ~37 MiB in 3 shards for the reference preset (~19 MiB in 2 if
        lean).

        Transformer weights are stored as they ship (bf16, diffusers' fp32 modules in fp32; a
        bf16 rounding per resume perturbs them less than one optimizer step does), the caption
        encoder in fp32, AdamW's exp_avg_sq in bf16. exp_avg is not stored: with beta1 =
        0.9 it has a ~10-step memory, so restarting it at zero only ramps the first ~10 updates
        after a resume, while storing it would add 18 MB: too close to the 60 MiB a GPU run may
        return, and over the 64 MiB working tree once the 20 MB shipped export sits beside it.
        A lean checkpoint drops exp_avg_sq too (beta2 = 0.99: a ~100-step memory, rebuilt during
        the re-warm), for device calls that also carry wheels beside the shipped export.
        """
        dtypes = {f"transformer.{n}": d for n, d in shipped_dtypes(self.transformer).items()}
        tensors = {name: p.detach().to(dtypes.get(name, torch.float32))
                   for name, p in self.named_params}
        if not self.config.lean_checkpoint:
            for name, p in self.named_params:
                state = self.optimizer.state.get(p, {})
                if "exp_avg_sq" in state:
                    tensors[MOMENT_PREFIX + name] = state["exp_avg_sq"].to(torch.bfloat16)
        return Checkpoint(tensors=tensors, state=self.training_state(), loss_csv=self.loss_csv)

    def training_state(self) -> dict:
        """The JSON-able record beside the weights in checkpoints and exports."""
        state = {"step": self.step, "train_seconds": self.train_seconds,
                 "preset": self.preset.name, "optimizer_restarted_at": self.restarted_at,
                 "config": _jsonable(self.config)}
        if self.initialised_from is not None:
            state["initialised_from"] = self.initialised_from
        return state

    def learning_rate(self, step: int) -> float:
        """The schedule's learning rate at `step`, with the re-warm after an optimizer restart."""
        return learning_rate(self.config, step, self.restarted_at)

    def load(self, ckpt: Checkpoint) -> None:
        """Restores weights, step, train time and loss curve, and AdamW's second moments if
        `ckpt` has them; if it has none (an export), AdamW restarts and the lr re-warms."""
        self._check_compatible(ckpt)
        self.step = int(ckpt.state["step"])
        self.train_seconds = float(ckpt.state["train_seconds"])
        self.loss_csv = with_mass_column(ckpt.loss_csv) or LOSS_HEADER
        self.restarted_at = ckpt.state.get("optimizer_restarted_at")
        self.initialised_from = ckpt.state.get("initialised_from")
        self.resumed_state = dict(ckpt.state)  # the record of these weights, as trained
        with torch.no_grad():
            for name, p in self.named_params:
                p.copy_(ckpt.tensors[name])
                moment = ckpt.tensors.get(MOMENT_PREFIX + name)
                if moment is not None:
                    self.optimizer.state[p] = self._adam_state(p, moment)
        logger.info("resumed at step %d (%.0f s trained)", self.step, self.train_seconds)
        if not any(name.startswith(MOMENT_PREFIX) for name in ckpt.tensors):
            self._restart_optimizer()

    def initialise(self, ckpt: Checkpoint, source: str | Path) -> None:
        """Starts a fine-tune from `ckpt`'s weights (any preset of the same architecture): step 0,
        fresh AdamW (the warmup ramps it), an empty loss curve; the source is recorded in the
        training state."""
        self._check_shapes(ckpt)
        with torch.no_grad():
            for name, p in self.named_params:
                p.copy_(ckpt.tensors[name])
        self.initialised_from = {"source": str(source), "preset": ckpt.state.get("preset"),
                                 "step": ckpt.state.get("step")}
        logger.info("initialised from %s (preset %s, step %s)", source,
                    ckpt.state.get("preset"), ckpt.state.get("step"))

    def _check_compatible(self, ckpt: Checkpoint) -> None:
        if ckpt.state.get("preset") != self.preset.name:
            raise ResumeMismatchError(f"checkpoint preset {ckpt.state.get('preset')!r} differs "
                                      f"from --preset {self.preset.name!r}")
        self._warn_changed(ckpt.state.get("config", {}))
        self._check_shapes(ckpt)

    def _check_shapes(self, ckpt: Checkpoint) -> None:
        missing = [n for n, _ in self.named_params if n not in ckpt.tensors]
        if missing:
            raise ResumeMismatchError(
                f"checkpoint lacks {len(missing)} weights, e.g. {missing[:3]}")
        wrong = [n for n, p in self.named_params if ckpt.tensors[n].shape != p.shape]
        if wrong:
            raise ResumeMismatchError(
                f"{len(wrong)} weights have other shapes than the preset's, e.g. {wrong[:3]}")

    def _restart_optimizer(self) -> None:
        """Fresh AdamW moments with Adam's own step at 0 (created lazily by the first step)."""
        self.optimizer.state.clear()
        self.restarted_at = self.step
        logger.info("optimizer restarted at step %d (no AdamW state in the resume source): "
                    "fresh moments, lr re-warms over %d steps into the schedule",
                    self.step, self.config.rewarm_steps)

    def _adam_state(self, p: torch.Tensor, exp_avg_sq: torch.Tensor) -> dict:
        group = self.optimizer.param_groups[0]
        on_device = group["fused"] or group["capturable"]
        step = torch.tensor(float(self.step), dtype=torch.float32,
                            device=p.device if on_device else "cpu")
        return {"step": step, "exp_avg": torch.zeros_like(p),
                "exp_avg_sq": exp_avg_sq.to(device=p.device, dtype=p.dtype)}

    def _warn_changed(self, saved: dict) -> None:
        """Warn of recipe settings that differ from the run that wrote the checkpoint (not in an
        export-only run, which trains nothing)."""
        if self.config.max_steps == 0:
            return
        current = _jsonable(self.config)
        for key in ("lr", "total_steps", "warmup_steps", "batch_size", "seed", "curriculum",
                    "foreground_weight", "concentration_weight", "concentration_target",
                    "concentration_over", "concentration_tile"):
            if key in saved and saved[key] != current[key]:
                logger.warning("%s changed on resume: %s -> %s", key, saved[key], current[key])

    def spec_at(self, step: int) -> ClipSpec:
        """The clips that global `step` trains on: the curriculum's stage, else the preset's."""
        return clip_spec_at(self.clip_spec, self.stages, step)

    def _batch(self, step: int):
        """Clips, token ids (caption dropout applied) and the noise/sigma generator for `step`."""
        seed = self.config.seed * 1_000_003 + step
        spec = self.spec_at(step)
        if spec != self._logged_spec:
            logger.info("step %d: clips of %d frames x %d x %d px", step, spec.frames,
                        spec.height, spec.width)
            self._logged_spec = spec
        clips = generate_clips(self.config.batch_size, seed, device=self.device, spec=spec)
        host = torch.Generator().manual_seed(seed + _AUX_SEED_OFFSET)
        ids = self.text_encoder.tokenizer.encode(clips.captions)  # ids: [B, L] on the host
        dropped = torch.rand(ids.shape[0], generator=host) < self.config.caption_dropout
        ids[dropped] = 0  # the null caption: all padding
        if self.device.type == "cuda":
            ids = ids.pin_memory()  # so the copy below does not wait for the GPU queue
        ids = ids.to(self.device, non_blocking=True)
        noise_gen = torch.Generator(device=self.device).manual_seed(seed + _AUX_SEED_OFFSET)
        return clips.video, clips.fg_mask, ids, noise_gen

    def train_step(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """One optimizer step on a fresh batch. Returns (the diffusion loss of this shard, grad
        norm of the whole batch, this shard's mean top-block attention mass if the concentration
        penalty is on, else None) as device scalars."""
        # x0: [B, 3, F, H, W]; fg_mask: bool [B, F, H, W], the sprites' pixels; ids: [B, L]
        x0, fg_mask, ids, gen = self._batch(self.step)
        sigma = sample_sigmas(x0.shape[0], gen, shift=self.preset.sigma_shift,
                              uniform_fraction=self.config.uniform_sigma_fraction)  # [B]
        noise = torch.randn(x0.shape, generator=gen, device=self.device)  # [B, 3, F, H, W]
        take = self.shard.take  # this rank's samples of the whole batch: B -> B / world
        if self.concentration is not None:  # drawn after the noise: that stream is unchanged
            grid = self.preset.token_grid(*x0.shape[2:])  # x0: [B, 3, F, H, W]
            self.concentration.sample(grid, x0.shape[0], gen, take=take)
        x0, fg_mask, ids = take(x0), take(fg_mask), take(ids)
        sigma, noise = take(sigma), take(noise)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            embeds = self.text_encoder(ids)  # embeds: [B / world, L, text_dim]
            pred = self.model(hidden_states=noisy_sample(x0, noise, sigma),
                              timestep=sigma * NUM_TRAIN_TIMESTEPS,
                              encoder_hidden_states=embeds, return_dict=False)[0]
        loss = weighted_mse(pred.float(), velocity_target(x0, noise), fg_mask,
                            self.config.foreground_weight)
        objective, mass = loss, None
        if self.concentration is not None:
            penalty, mass = self.concentration.penalty()
            objective = loss + self.config.concentration_weight * penalty
        objective.backward()
        params = [p for _, p in self.named_params]
        if self.shard.world > 1:
            self._average_gradients(params)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, self.config.grad_clip)
        for group in self.optimizer.param_groups:
            group["lr"] = self.learning_rate(self.step)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return loss.detach(), grad_norm.detach(), mass

    def _average_gradients(self, params: list[torch.nn.Parameter]) -> None:
        """Each gradient becomes its mean over the ranks, i.e. the whole batch's gradient (equal
        shards of a mean loss). One all-reduce of one flat fp32 buffer; a missing gradient counts
        as zeros so that every rank reduces the same shapes."""
        grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in params]
        flat = _flatten_dense_tensors(grads)  # [total parameter count]
        dist.all_reduce(flat)  # SUM: gloo has no AVG
        flat /= self.shard.world
        for p, grad in zip(params, _unflatten_dense_tensors(flat, grads), strict=True):
            p.grad = grad

    def save(self) -> Path:
        """Writes the checkpoint to <out>/checkpoint atomically."""
        return save_checkpoint(Path(self.config.out) / CHECKPOINT_DIR, self.checkpoint())

    def run(self) -> None:
        """Trains until max_steps or the time budget, saves, and exports if asked (the main
        shard only)."""
        if self.config.resume is not None:
            self.load(load_resume_source(self.config.resume))
        elif self.config.init is not None:
            self.initialise(load_resume_source(self.config.init), self.config.init)
        first_step = self.step
        if self.config.stop_step is not None and first_step >= self.config.stop_step:
            logger.info("step %d is at --stop-at-step %d: nothing to train (raise --stop-at-step "
                        "and --total-steps to train on)", first_step, self.config.stop_step)
        _TrainLoop(self).run()
        if not self.shard.main:
            return
        if self.step > first_step:
            self.save()
        if self.config.export is not None:
            # Nothing trained since the resume: the weights' record is the resume source's (its
            # run's config and optimizer restart), not this export-only command's.
            untrained = self.step == first_step and self.resumed_state is not None
            state = self.resumed_state if untrained else self.training_state()
            export_pipeline(self.transformer, self.text_encoder, self.preset, self.config.export,
                            state=state, loss_csv=self.loss_csv)


def load_resume_source(directory: str | Path) -> Checkpoint:
    """Reads what `--resume` names: an exported pipeline folder (it has model_index.json; no
    optimizer state) or a checkpoint folder (state.json + shards).

    Raises:
        CheckpointError: if `directory` is neither, or is a damaged one of the two.
    """
    folder = Path(directory)
    if (folder / MODEL_INDEX_FILE).is_file():
        return load_export(folder)
    if is_checkpoint(folder):
        return load_checkpoint(folder)
    raise CheckpointError(
        f"cannot resume from {folder}: it is neither a training checkpoint (no state.json, e.g. "
        f"<out>/{CHECKPOINT_DIR}) nor an exported pipeline (no {MODEL_INDEX_FILE}, e.g. "
        "artifacts/models/ditplan-ref-t2v)")


class _TrainLoop:
    """The step loop: logging, periodic saves and the time-budget stop rule, the same on all
    ranks (the logged loss is the whole batch's; any rank out of time stops them all)."""

    def __init__(self, trainer: Trainer):
        self.t = trainer
        self.loss_sum = torch.zeros((), device=trainer.device)
        self.grad_sum = torch.zeros((), device=trainer.device)
        self.mass_sum = torch.zeros((), device=trainer.device)  # with the concentration penalty
        self.window_steps = 0
        self.window_start = time.monotonic()
        self.step_seconds = 0.0  # recent wall seconds per step, 0 until measured

    def run(self) -> None:
        cfg, start_step = self.t.config, self.t.step
        while not self._should_stop(start_step):
            tick = time.monotonic()
            loss, grad_norm, mass = self.t.train_step()
            self.loss_sum += loss
            self.grad_sum += grad_norm
            if mass is not None:
                self.mass_sum += mass
            self.window_steps += 1
            if self.t.step - start_step == 2 and not self.step_seconds:
                # the first step of a run compiles (minutes on a GPU): the second one is timed,
                # waiting for it (one host sync a run), until the first log measures a window
                loss.item()
                self.step_seconds = time.monotonic() - tick
            if self.t.step % cfg.log_every == 0:
                self._log()
            if cfg.save_every and self.t.step % cfg.save_every == 0 and self.t.shard.main:
                self.t.save()
        if self.window_steps:
            self._log()

    def _should_stop(self, start_step: int) -> bool:
        cfg = self.t.config
        if cfg.max_steps is not None and self.t.step - start_step >= cfg.max_steps:
            return True
        if cfg.stop_step is not None and self.t.step >= cfg.stop_step:
            return True
        if cfg.time_budget_min is None:
            return False
        elapsed = time.monotonic() - self.t.started_at
        stop = elapsed + 2 * self.step_seconds + cfg.reserve_s > 60 * cfg.time_budget_min
        if self.t.shard.world == 1:
            return stop
        decision = torch.tensor(float(stop), device=self.t.device)  # 0/1 scalar
        dist.all_reduce(decision, op=dist.ReduceOp.MAX)  # ranks' clocks differ: any stops all
        return bool(decision.item())

    def _log(self) -> None:
        if self.t.shard.world > 1:  # the whole batch's: the mean of the equal shards'
            for total in (self.loss_sum, self.mass_sum):
                dist.all_reduce(total)
                total /= self.t.shard.world
        loss = self.loss_sum.item() / self.window_steps  # host syncs: once a log, not a step
        grad = self.grad_sum.item() / self.window_steps
        seconds = time.monotonic() - self.window_start
        self.step_seconds = seconds / self.window_steps
        self.t.train_seconds += seconds
        lr = self.t.learning_rate(self.t.step - 1)
        rate = self.window_steps * self.t.config.batch_size / max(seconds, 1e-9)
        mass = (self.mass_sum.item() / self.window_steps if self.t.concentration is not None
                else None)  # the penalty's sampled mass, when it is on
        self.t.loss_csv += (f"{self.t.step},{self.t.train_seconds:.1f},{loss:.6f},{lr:.3e},"
                            f"{grad:.4f},{rate:.1f},{'' if mass is None else f'{mass:.4f}'}\n")
        peak = (f"  {torch.cuda.max_memory_allocated(self.t.device) / 2**30:.1f} GiB peak"
                if self.t.device.type == "cuda" else "")
        mass_text = "" if mass is None else f"  top-block mass {mass:.3f}"
        logger.info("step %d  loss %.4f  lr %.2e  grad %.3f  %.0f clips/s  %.0f s elapsed%s%s",
                    self.t.step, loss, lr, grad, rate, time.monotonic() - self.t.started_at, peak,
                    mass_text)
        self.loss_sum.zero_()
        self.grad_sum.zero_()
        self.mass_sum.zero_()
        self.window_steps = 0
        self.window_start = time.monotonic()


def with_mass_column(loss_csv: str) -> str:
    """A loss curve in the current columns: one written before the top_block_mass column gains
    it, empty in every row; a current one (or "") is returned as it is."""
    if not loss_csv.startswith(_LOSS_HEADER_BEFORE_MASS):
        return loss_csv
    rows = loss_csv[len(_LOSS_HEADER_BEFORE_MASS):].splitlines()
    return LOSS_HEADER + "".join(f"{row},\n" for row in rows)


def _jsonable(config: TrainConfig) -> dict:
    fields = dataclasses.asdict(config)
    return {k: (str(v) if isinstance(v, Path) else list(v) if isinstance(v, tuple) else v)
            for k, v in fields.items()}
