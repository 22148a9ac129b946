"""The expert index of a Wan2.2 profile: the steps each expert ran, recorded, and its traces."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from ditplan.policy.atomic import atomic_write_text
from ditplan.profiler.schema import TraceError

EXPERTS_INDEX = "experts.json"
INDEX_VERSION = 1


@dataclass(frozen=True)
class ExpertIndex:
    """Which steps ``[start, stop)`` each expert of a two-expert pipeline ran, in the order it
    ran them, as the profile recorded its calls.

    Each expert's traces sit in ``<profile folder>/<expert>/`` and number its steps from 0
    (its step ``s`` is the generation's step ``start + s``), so every expert folder is an
    ordinary trace folder of one transformer that ``compile_policy`` compiles unchanged.
    """

    boundary_ratio: float
    steps: int
    step_ranges: dict[str, tuple[int, int]]

    @classmethod
    def from_calls(cls, calls: dict[str, list[int]], steps: int,
                   boundary_ratio: float) -> ExpertIndex:
        """From the step of every call of each expert (in execution order of the experts).

        Refuses (TraceError) an expert that ran no step or steps that are not one range, and
        ranges that do not tile the ``steps`` steps in the experts' order.
        """
        ranges, stop = {}, 0
        for name, seen in calls.items():
            ran = sorted(set(seen))
            if not ran:
                raise TraceError(f"{name} ran none of the {steps} steps at boundary_ratio "
                                 f"{boundary_ratio}: profile with more --steps so that each "
                                 "expert runs at least one")
            if ran != list(range(ran[0], ran[-1] + 1)) or ran[0] != stop:
                raise TraceError(f"{name} ran steps {ran}, not one range starting at step "
                                 f"{stop}; ditplan profiles pipelines that run each expert "
                                 "on one range of steps, the high-noise expert first")
            ranges[name] = (ran[0], ran[-1] + 1)
            stop = ran[-1] + 1
        if stop != steps:
            raise TraceError(f"the experts ran steps 0..{stop - 1} of {steps}; every step must "
                             "run one expert")
        return cls(float(boundary_ratio), steps, ranges)

    def to_json(self) -> str:
        data = {"version": INDEX_VERSION, "boundary_ratio": self.boundary_ratio,
                "steps": self.steps,
                "step_ranges": {n: list(r) for n, r in self.step_ranges.items()}}
        return json.dumps(data, indent=2) + "\n"


def write_index(out_dir: str | os.PathLike, index: ExpertIndex) -> Path:
    """Write ``out_dir/experts.json`` atomically, creating the folder; the written path."""
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    return atomic_write_text(Path(out_dir) / EXPERTS_INDEX, index.to_json())


def read_index(trace_dir: str | os.PathLike) -> ExpertIndex | None:
    """The expert index of a profile folder; None for a one-transformer profile (no index)."""
    path = Path(trace_dir) / EXPERTS_INDEX
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        version = int(data["version"])
        ranges = {str(n): (int(r[0]), int(r[1])) for n, r in data["step_ranges"].items()}
        index = ExpertIndex(float(data["boundary_ratio"]), int(data["steps"]), ranges)
    except (OSError, ValueError, KeyError, TypeError, IndexError) as exc:
        raise TraceError(f"{path} is unreadable ({exc!r}); re-run `ditplan profile` into an "
                         "empty folder") from exc
    if version > INDEX_VERSION:
        raise TraceError(f"{path}: expert index version {version} is newer than this ditplan "
                         f"reads ({INDEX_VERSION}); upgrade ditplan")
    return index
