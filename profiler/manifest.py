"""The output folder's manifest: which run it holds and which (prompt, seed) units are finished.

A rerun with the same arguments skips finished units; different arguments are refused, since a
trace directory must hold one model, one workload and one profiler setting.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

logger = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
MANIFEST_VERSION = 1


class ProfileDirError(ValueError):
    """The output folder holds another run, or something that is not a ditplan profile."""


class Manifest:
    """manifest.json of a profile folder: run id, run arguments, finished units -> files."""

    def __init__(self, out_dir: Path, run_id: str, arguments: dict, finished: dict | None = None):
        self.out_dir = Path(out_dir)
        self.run_id = run_id
        self.arguments = arguments
        self.finished: dict[str, list[str]] = dict(finished or {})

    @property
    def path(self) -> Path:
        return self.out_dir / MANIFEST_NAME

    @classmethod
    def open(cls, out_dir: Path, run_id: str, arguments: dict) -> Manifest:
        """The folder's manifest, or a new one; ProfileDirError if it belongs to another run."""
        out_dir = Path(out_dir)
        path = out_dir / MANIFEST_NAME
        if not path.exists():
            _check_no_foreign_traces(out_dir)
            return cls(out_dir, run_id, arguments)
        try:
            data = json.loads(path.read_text())
            saved_args, finished = data["arguments"], data["finished"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ProfileDirError(f"{path} is unreadable ({exc}); delete {out_dir} or choose "
                                  "another --out") from exc
        if saved_args != arguments:
            raise ProfileDirError(_mismatch_message(out_dir, saved_args, arguments))
        return cls(out_dir, data.get("run_id", run_id), arguments, finished)

    def is_finished(self, unit: str) -> bool:
        """True when the unit is recorded as finished and its files are readable Parquet.

        A file deleted or damaged after the run (e.g. truncated by a copy) makes the unit
        unfinished, so a rerun profiles it again.
        """
        files = self.finished.get(unit)
        if not files:
            return False
        broken = [f for f in files if not _readable_parquet(self.out_dir / f)]
        if broken:
            logger.warning("%s: %s missing or unreadable; profiling it again", unit, broken)
        return not broken

    def mark_finished(self, unit: str, paths: list[Path]) -> None:
        """Record a unit's files and save the manifest atomically."""
        self.finished[unit] = sorted(str(Path(p).relative_to(self.out_dir)) for p in paths)
        self.save()

    def save(self) -> None:
        data = {"version": MANIFEST_VERSION, "run_id": self.run_id, "arguments": self.arguments,
                "finished": dict(sorted(self.finished.items()))}
        self.out_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{MANIFEST_NAME}.", suffix=".tmp", dir=self.out_dir)
        try:
            with os.fdopen(fd, "w") as handle:
                json.dump(data, handle, indent=2, sort_keys=True)
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def profiled_arguments(out_dir: str | os.PathLike) -> dict:
    """The arguments a profile folder was made with ({} when it has no readable manifest)."""
    try:
        return dict(json.loads((Path(out_dir) / MANIFEST_NAME).read_text())["arguments"])
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def _readable_parquet(path: Path) -> bool:
    try:
        pq.read_metadata(path)
    except (OSError, pa.ArrowException):
        return False
    return True


def _check_no_foreign_traces(out_dir: Path) -> None:
    if out_dir.is_dir() and any(out_dir.rglob("*.parquet")):
        raise ProfileDirError(f"{out_dir} holds Parquet files but no {MANIFEST_NAME}: it is not "
                              "a `ditplan profile` folder; choose an empty or new --out")


def _mismatch_message(out_dir: Path, saved: dict, wanted: dict) -> str:
    keys = sorted(set(saved) | set(wanted))
    diff = [f"{k}: {saved.get(k)!r} -> {wanted.get(k)!r}" for k in keys
            if saved.get(k) != wanted.get(k)]
    return (f"{out_dir} holds a profile run with other arguments ({'; '.join(diff)}); rerun with "
            "the same arguments to resume it, or choose another --out")
