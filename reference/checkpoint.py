"""Sharded, atomically replaced training checkpoints: safetensors shards + state.json + loss.csv.

Every shard stays under `max_shard_bytes` (default 15 MiB) so each file can travel on its own
through transfer limits of 16 MiB per file. A checkpoint folder is written beside its final
place, then swapped in; a crash leaves either the old or the new folder complete (a leftover
`<name>.old` is picked up by `load_checkpoint`).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
STATE_FILE = "state.json"
LOSS_FILE = "loss.csv"
MAX_SHARD_BYTES = 15 * 2**20  # tensor bytes; the safetensors header adds ~30 KB per shard


class CheckpointError(ValueError):
    """A checkpoint folder is missing, incomplete or of another format."""


@dataclass
class Checkpoint:
    """tensors: flat name -> tensor; state: JSON-able dict; loss_csv: the loss curve text."""

    tensors: dict[str, torch.Tensor]
    state: dict
    loss_csv: str


def plan_shards(tensors: dict[str, torch.Tensor], max_shard_bytes: int) -> list[list[str]]:
    """Packs tensor names, in sorted order, into consecutive shards of at most max_shard_bytes."""
    shards: list[list[str]] = [[]]
    size = 0
    for name in sorted(tensors):
        nbytes = tensors[name].numel() * tensors[name].element_size()
        if nbytes > max_shard_bytes:
            raise CheckpointError(f"tensor {name} ({nbytes} B) exceeds the shard limit")
        if size + nbytes > max_shard_bytes and shards[-1]:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def _write_folder(folder: Path, ckpt: Checkpoint, max_shard_bytes: int) -> None:
    folder.mkdir(parents=True)
    index = {}
    for i, names in enumerate(plan_shards(ckpt.tensors, max_shard_bytes)):
        shard = f"shard-{i:05d}.safetensors"
        save_file({n: ckpt.tensors[n].detach().contiguous().cpu() for n in names}, folder / shard)
        index.update(dict.fromkeys(names, shard))
    state = {"format_version": FORMAT_VERSION, "index": index, **ckpt.state}
    (folder / STATE_FILE).write_text(json.dumps(state, indent=1, sort_keys=True))
    (folder / LOSS_FILE).write_text(ckpt.loss_csv)


def save_checkpoint(directory: str | Path, ckpt: Checkpoint,
                    max_shard_bytes: int = MAX_SHARD_BYTES) -> Path:
    """Writes `ckpt` to `directory`, replacing any previous checkpoint there.

    Returns:
        the checkpoint folder.
    """
    final = Path(directory)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    old = final.with_name(final.name + ".old")
    for stale in final.parent.glob(f".{final.name}.tmp-*"):  # left by a killed run
        shutil.rmtree(stale, ignore_errors=True)
    try:
        _write_folder(tmp, ckpt, max_shard_bytes)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)
    logger.info("saved checkpoint %s (%d tensors)", final, len(ckpt.tensors))
    return final


def _locate(folder: Path) -> Path | None:
    """`folder`, else its `.old` twin left by a crash, if it holds a state file; else None."""
    for candidate in (folder, folder.with_name(folder.name + ".old")):
        if (candidate / STATE_FILE).is_file():
            return candidate
    return None


def is_checkpoint(directory: str | Path) -> bool:
    """Whether `directory` (or its `.old` twin) holds a checkpoint that load_checkpoint reads."""
    return _locate(Path(directory)) is not None


def load_checkpoint(directory: str | Path) -> Checkpoint:
    """Reads a checkpoint written by save_checkpoint (or its `.old` twin after a crash).

    Raises:
        CheckpointError: if the folder or any listed shard is missing or the format differs.
    """
    folder = _locate(Path(directory))
    if folder is None:
        raise CheckpointError(f"no checkpoint at {directory} (missing {STATE_FILE})")
    if folder != Path(directory):
        logger.warning("using %s: %s was not completely replaced", folder, directory)
    state = json.loads((folder / STATE_FILE).read_text())
    if state.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{folder} has format {state.get('format_version')}, "
                              f"this code reads {FORMAT_VERSION}")
    index = state.pop("index")
    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(set(index.values())):
        if not (folder / shard).is_file():
            raise CheckpointError(f"{folder} is incomplete: {shard} is missing")
        tensors.update(load_file(folder / shard))
    if set(tensors) != set(index):
        raise CheckpointError(f"{folder}: shard contents do not match {STATE_FILE}")
    loss_path = folder / LOSS_FILE
    loss_csv = loss_path.read_text() if loss_path.is_file() else ""
    del state["format_version"]
    return Checkpoint(tensors=tensors, state=state, loss_csv=loss_csv)
