"""Result rows as JSON lines: one row per method x setting, rewritten atomically after each row."""

from __future__ import annotations

import json
import math
import platform
import time
from pathlib import Path

import torch

from ditplan.runtime.outputs import atomic_write

QUALITY_FILE = "quality.jsonl"
SCALE_FILE = "scale.jsonl"
FINISHED = ("ok", "not_applicable")


def json_safe(value):
    """NaN and +-inf become None, recursively (rows stay strict JSON)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def read_rows(path: Path) -> list[dict]:
    """The rows of a results file ([] when it does not exist)."""
    if not path.exists():
        return []
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}:{number} is not a JSON row ({error}); delete the file "
                             "to start over") from error
    return rows


class ResultStore:
    """The rows of one results file; rows of other runs (another ``run_key``) are kept."""

    def __init__(self, path: Path, run_key: str):
        self.path = Path(path)
        self.run_key = run_key
        self.rows = read_rows(self.path)

    def done(self, name: str) -> bool:
        """True when this run already finished ``name`` (failed rows are retried)."""
        return any(r["method"] == name and r["run_key"] == self.run_key
                   and r["status"] in FINISHED for r in self.rows)

    def add(self, row: dict) -> None:
        """Add or replace the row of ``row['method']`` for this run, then rewrite the file."""
        row = json_safe({**row, "run_key": self.run_key})
        self.rows = [r for r in self.rows
                     if not (r["method"] == row["method"] and r["run_key"] == self.run_key)]
        self.rows.append(row)
        text = "".join(json.dumps(r, sort_keys=True, allow_nan=False) + "\n" for r in self.rows)
        atomic_write(self.path, lambda p: p.write_text(text))

    def current(self) -> list[dict]:
        """The rows of this run."""
        return [r for r in self.rows if r["run_key"] == self.run_key]


def environment(device: str, command: str) -> dict:
    """Card, versions, date and the command line, recorded in every row."""
    import diffusers

    is_cuda = torch.device(device).type == "cuda"
    card = torch.cuda.get_device_name() if is_cuda else f"cpu ({platform.processor() or 'cpu'})"
    return {"card": card, "torch": torch.__version__, "diffusers": diffusers.__version__,
            "date": time.strftime("%Y-%m-%d"), "device": device,
            "command": command}
