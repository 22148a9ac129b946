"""benchmarks/long_part3.sh dry-run with a stand-in python3 on PATH: the commands it issues, where
each stage works for a tile, and what it copies into RESULTS."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# Logs each command; writes what the real one would (python3 -c goes to the real interpreter).
FAKE_PYTHON = """#!/bin/bash
if [[ $1 == -c ]]; then exec {python} "$@"; fi
echo "$*" >> {calls}
out=""; json=""; prev=""
for a in "$@"; do [[ $prev == --out ]] && out=$a; [[ $prev == --json ]] && json=$a; prev=$a; done
case "$*" in
  *tools/eval_reference.py*) mkdir -p "$out"; echo {{}} > "$out/eval_results.json";;
  *tools/attention_concentration.py*) echo {{}} > "$json";;
  *"runtime.cli profile"*) mkdir -p "$out";;
  *benchmarks.quality*) mkdir -p "$out/traces"; echo row > "$out/table.md";;
esac
"""


def _run(tmp: Path, results: str, tile: str | None) -> list[str]:
    bin_dir = tmp / "bin"
    bin_dir.mkdir(exist_ok=True)
    fake = bin_dir / "python3"
    fake.write_text(FAKE_PYTHON.format(python=sys.executable, calls=tmp / "calls.log"))
    fake.chmod(0o755)
    model = tmp / "model"
    model.mkdir(exist_ok=True)
    (model / "model_index.json").write_text("{}")
    (model / "training_state.json").write_text(json.dumps({"step": 4275}))
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}",
           "LONG_PART3_MODEL": str(model), "LONG_PART3_RUN": str(tmp / "no-run"),
           "LONG_PART3_WORK": str(tmp / "work")}
    if tile is not None:
        env["LONG_PART3_TILE"] = tile
    (tmp / "calls.log").unlink(missing_ok=True)
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "long_part3.sh"), str(tmp / results)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "part 3 done" in done.stdout
    return (tmp / "calls.log").read_text().splitlines()


def test_a_tile_works_in_its_own_folder_and_the_evaluation_is_shared(tmp_path):
    step = tmp_path / "work" / "step-4275"
    calls = _run(tmp_path, "tiled", "8x4x4")
    profile = next(c for c in calls if "runtime.cli profile" in c)
    assert f"--out {step}/tile-8x4x4/concentration" in profile and profile.endswith("--tile 8x4x4")
    bench = [c for c in calls if "benchmarks.quality" in c]
    assert all(f"--out {step}/tile-8x4x4/quality --tile 8x4x4" in c for c in bench)
    assert bench[-1].endswith("--report-only")  # the table redrawn for the same run key
    assert any(f"tools/eval_reference.py --model {tmp_path}/model --out {step}/eval" in c
               for c in calls)
    copied = {p.name for p in (tmp_path / "tiled").iterdir()}
    assert {"eval_results.json", "attention_concentration.json", "table.md",
            "long_traces.tgz"} <= copied

    calls = _run(tmp_path, "default", None)  # the default tile: step-N itself; no second eval
    assert not any("eval_reference" in c for c in calls)
    profile = next(c for c in calls if "runtime.cli profile" in c)
    assert f"--out {step}/concentration" in profile and profile.endswith("--tile 1x8x8")
    assert (tmp_path / "default" / "eval_results.json").is_file()  # copied from step-N/eval
