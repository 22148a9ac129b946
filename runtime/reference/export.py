"""Writes the shippable diffusers-layout folder of the reference model (weights <= 25 MB)."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import torch
from diffusers import WanTransformer3DModel

from ditplan.runtime.reference.captions import CaptionEncoder
from ditplan.runtime.reference.config import ModelPreset, build_scheduler
from ditplan.runtime.reference.pipeline import ReferenceVideoPipeline

logger = logging.getLogger(__name__)

MAX_EXPORT_BYTES = 25 * 10**6


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
) -> Path:
    """Saves a ReferenceVideoPipeline folder (model_index.json, transformer/, text_encoder/,
    scheduler/) loadable with `ReferenceVideoPipeline.from_pretrained(directory)`; other files
    already in `directory` (model card, figures) are kept.

    The transformer is stored in `dtype` (fp32 where diffusers keeps it fp32); the caption encoder,
    under 1 MB, in float32. It is written beside `directory`, then each entry is swapped in.

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
