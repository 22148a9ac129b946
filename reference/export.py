"""The shippable diffusers-layout folder of the reference model (weights <= 25 MB): writing it,
with its training record (training_state.json + loss.csv), and reading it back to resume training.

An export holds no optimizer state (it would more than double the size), so a run resumed from
one restarts AdamW; `training.learning_rate` re-warms the learning rate after such a restart.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

import torch
from diffusers import WanTransformer3DModel
from safetensors.torch import load_file

from ditplan.reference.captions import CaptionEncoder
from ditplan.reference.checkpoint import LOSS_FILE, Checkpoint, CheckpointError
from ditplan.reference.config import REFERENCE, ModelPreset, build_scheduler, get_preset
from ditplan.reference.pipeline import ReferenceVideoPipeline

logger = logging.getLogger(__name__)

MAX_EXPORT_BYTES = 25 * 10**6
MODEL_INDEX_FILE = "model_index.json"
TRAINING_STATE_FILE = "training_state.json"
TRAINING_STATE_VERSION = 1
TRAINED_PARTS = ("transformer", "text_encoder")  # the folders whose weights training owns


class ExportTooLargeError(ValueError):
    """The exported weights exceed the size the repository can ship."""


def folder_bytes(folder: Path) -> int:
    """Total size of the regular files under `folder`."""
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def shipped_dtypes(transformer: WanTransformer3DModel,
                   dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.dtype]:
    """Parameter name -> stored dtype: `dtype`, except the class's _keep_in_fp32_modules.

    This is the layout `from_pretrained(..., torch_dtype=dtype)` produces, so storing it loses
    nothing that loading would keep. Training checkpoints use the same layout, so an export from
    a checkpoint equals an export from the live model.
    """
    keep = set(transformer._keep_in_fp32_modules or [])
    return {name: torch.float32 if keep & set(name.split(".")) else dtype
            for name, _ in transformer.named_parameters()}


def cast_transformer(transformer: WanTransformer3DModel, dtype: torch.dtype) -> None:
    """Casts parameters in place to the shipped_dtypes layout."""
    dtypes = shipped_dtypes(transformer, dtype)
    for name, param in transformer.named_parameters():
        param.data = param.data.to(dtypes[name])


def export_pipeline(
    transformer: WanTransformer3DModel,
    text_encoder: CaptionEncoder,
    preset: ModelPreset,
    directory: str | Path,
    dtype: torch.dtype = torch.bfloat16,
    *,
    state: dict | None = None,
    loss_csv: str | None = None,
) -> Path:
    """Saves a ReferenceVideoPipeline folder (model_index.json, transformer/, text_encoder/,
    scheduler/) loadable with `ReferenceVideoPipeline.from_pretrained(directory)`; other files
    already in `directory` (model card, figures) are kept.

    The transformer is stored in `dtype` (fp32 where diffusers keeps it fp32); the caption encoder,
    under 1 MB, in float32. It is written beside `directory`, then each entry is swapped in.
    With `state` (the trainer's step, train_seconds, preset, config), training_state.json and
    loss.csv are written too, so that `load_export` can resume training from the folder.

    Raises:
        ExportTooLargeError: if the folder would exceed MAX_EXPORT_BYTES (nothing is replaced).
    """
    final = Path(directory)
    shipped = WanTransformer3DModel.from_config(transformer.config)
    shipped.load_state_dict(transformer.state_dict())
    cast_transformer(shipped, dtype)
    encoder = CaptionEncoder.from_config(text_encoder.config)
    encoder.load_state_dict(text_encoder.state_dict())
    pipe = ReferenceVideoPipeline(shipped.eval(), encoder.float().eval(), build_scheduler(preset))
    tmp = final.with_name(f".{final.name}.export-tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        pipe.save_pretrained(tmp)
        if state is not None:
            write_training_state(tmp, state)
            (tmp / LOSS_FILE).write_text(loss_csv or "")
        size = folder_bytes(tmp)
        if size > MAX_EXPORT_BYTES:
            raise ExportTooLargeError(f"export is {size / 1e6:.1f} MB, the limit is "
                                      f"{MAX_EXPORT_BYTES / 1e6:.0f} MB; use a smaller dtype")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _swap_in(tmp, final)
    logger.info("exported %s (%.1f MB)", final, size / 1e6)
    return final


def _swap_in(tmp: Path, final: Path) -> None:
    """Moves each entry of `tmp` into `final`, replacing entries of the same name one by one;
    other files in `final` (the model card, sample grid) stay."""
    final.mkdir(parents=True, exist_ok=True)
    for entry in sorted(tmp.iterdir()):
        target = final / entry.name
        if entry.is_dir():
            old = final / f".{entry.name}.old"
            shutil.rmtree(old, ignore_errors=True)
            if target.exists():
                target.rename(old)
            entry.rename(target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(entry, target)
    tmp.rmdir()


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of the trained parts (transformer/, text_encoder/) under `folder`."""
    return sorted(f for part in TRAINED_PARTS for f in (folder / part).glob("*.safetensors"))


def _weight_hashes(folder: Path) -> dict[str, str]:
    return {f.relative_to(folder).as_posix(): hashlib.sha256(f.read_bytes()).hexdigest()
            for f in weight_files(folder)}


def write_training_state(folder: str | Path, state: dict) -> Path:
    """Writes <folder>/training_state.json: `state` plus the sha256 of each weight file now in
    `folder`, so that a later resume can tell whether the weights are still the ones trained.

    Returns:
        the path written (atomically: a temp file in the same folder, then os.replace).
    """
    folder = Path(folder)
    record = {**state, "format_version": TRAINING_STATE_VERSION,
              "weights_sha256": _weight_hashes(folder)}
    path = folder / TRAINING_STATE_FILE
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)
    return path


def trained_preset(pipe: ReferenceVideoPipeline) -> ModelPreset:
    """The preset a loaded reference pipeline was trained as (see :func:`folder_preset`; a
    pipeline built in memory: the reference preset)."""
    folder = getattr(pipe.config, "_name_or_path", None)
    return folder_preset(folder) if folder else REFERENCE


def folder_preset(folder: str | Path) -> ModelPreset:
    """The preset an export folder's training_state.json names (so clips drawn for it match
    its training data), else the reference preset (an export without its record)."""
    record = Path(folder) / TRAINING_STATE_FILE
    if not record.is_file():
        return REFERENCE
    try:
        return get_preset(json.loads(record.read_text())["preset"])
    except (ValueError, KeyError, TypeError) as error:
        raise CheckpointError(f"{record} names no known preset ({error}): re-export the folder "
                              "with tools/train_reference.py --export") from error


def pipeline_preset_name(folder: str | Path, preset: str | None = None) -> str:
    """For a tool's --model FOLDER [--preset NAME]: NAME, else the folder's preset
    (folder_preset), once the folder is known to hold a pipeline.

    Raises:
        CheckpointError: if the folder has no model_index.json, or (without NAME) its training
            record names no known preset.
    """
    if not (Path(folder) / MODEL_INDEX_FILE).is_file():
        raise CheckpointError(f"{folder} is not a pipeline folder (no {MODEL_INDEX_FILE})")
    return preset if preset is not None else folder_preset(folder).name


def load_export(directory: str | Path) -> Checkpoint:
    """Reads an exported folder back as a training checkpoint without optimizer state.

    Returns:
        Checkpoint with tensors "transformer.<param>" / "text_encoder.<param>" exactly as stored
        (bf16 and fp32), state from training_state.json (step, train_seconds, preset, config) and
        the loss curve from loss.csv ("" if absent).

    Raises:
        CheckpointError: no training_state.json (an export written without its training record),
            another format, or weight files that differ from the ones the record was written for.
    """
    folder = Path(directory)
    record_path = folder / TRAINING_STATE_FILE
    if not record_path.is_file():
        raise CheckpointError(
            f"{folder} is an exported pipeline without {TRAINING_STATE_FILE}, so its step count "
            "is unknown; re-export it with tools/train_reference.py --export, or resume from a "
            "checkpoint folder")
    state = json.loads(record_path.read_text())
    if state.pop("format_version", None) != TRAINING_STATE_VERSION:
        raise CheckpointError(f"{record_path} is not format {TRAINING_STATE_VERSION}")
    if state.pop("weights_sha256", None) != _weight_hashes(folder):
        raise CheckpointError(
            f"the weight files in {folder} are not the ones {TRAINING_STATE_FILE} was written "
            "for (sha256 differs): re-export the folder with tools/train_reference.py --export")
    tensors = {f"{file.parent.name}.{name}": tensor
               for file in weight_files(folder) for name, tensor in load_file(file).items()}
    loss_path = folder / LOSS_FILE
    loss_csv = loss_path.read_text() if loss_path.is_file() else ""
    return Checkpoint(tensors=tensors, state=state, loss_csv=loss_csv)
