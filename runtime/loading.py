"""Resolve ``--model`` (``reference``, a local diffusers folder, or a hub id) to a pipeline."""

from __future__ import annotations

import importlib
import json
import logging
from importlib import resources
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

REFERENCE = "reference"
REFERENCE_MODEL_NAME = "ditplan-ref-t2v"


def reference_model_dir() -> Path:
    """The shipped reference model's diffusers folder (package data under ditplan.artifacts)."""
    return Path(str(resources.files("ditplan.artifacts"))) / "models" / REFERENCE_MODEL_NAME


# ditplan's own pipeline classes, by the class name a saved folder's model_index.json records.
OWN_PIPELINES = {"ReferenceVideoPipeline": "ditplan.reference.pipeline",
                 "ReferenceExpertsPipeline": "ditplan.reference.experts"}


def _pipeline_class(path: Path):
    """ditplan's own pipeline class for folders it wrote, else diffusers' auto-resolution."""
    index = path / "model_index.json"
    name = json.loads(index.read_text()).get("_class_name") if index.is_file() else None
    if name in OWN_PIPELINES:
        return getattr(importlib.import_module(OWN_PIPELINES[name]), name)
    from diffusers import DiffusionPipeline

    return DiffusionPipeline


def load_pipeline(model: str = REFERENCE, *, device: str = "cpu", dtype: torch.dtype | None = None):
    """Load a diffusers pipeline for ``model`` and move it to ``device``.

    Args:
        model: ``"reference"`` (the built-in model), a local diffusers folder, or a hub id.
        device: torch device string.
        dtype: weights dtype; defaults to float32 on CPU and bfloat16 elsewhere.

    Returns:
        The pipeline, with a progress bar enabled.
    """
    dtype = dtype or (torch.float32 if torch.device(device).type == "cpu" else torch.bfloat16)
    path = reference_model_dir() if model == REFERENCE else Path(model)
    if model == REFERENCE and not (path / "model_index.json").is_file():
        raise FileNotFoundError(
            f"the reference model is missing from {path}; reinstall ditplan or pass --model"
        )
    if not path.exists() and "/" not in model:
        raise FileNotFoundError(
            f"--model {model!r} is neither 'reference', an existing folder, nor a hub id "
            "(owner/name)"
        )
    pipeline_class = _pipeline_class(path)
    pipe = pipeline_class.from_pretrained(path if path.exists() else model, dtype=dtype)
    logger.info("loaded %s (%s) on %s", model, type(pipe).__name__, device)
    return pipe.to(device)
