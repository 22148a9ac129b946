"""A regular (non-editable) install into a fresh virtual environment has all ditplan packages."""

from __future__ import annotations

import subprocess
import sys
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHECK = """
import importlib.resources as r, sys
import ditplan.policy, ditplan.profiler, ditplan.reference, ditplan.runtime
assert 'torch' not in sys.modules, 'package imports must stay lazy'
assert (r.files('ditplan.policy') / 'plan.schema.json').is_file()
models = r.files('ditplan.artifacts') / 'models' / 'ditplan-ref-t2v'
assert (models / 'model_index.json').is_file()
assert (models / 'transformer' / 'diffusion_pytorch_model.safetensors').is_file()
assert any(p.name.endswith('.json') for p in (r.files('ditplan.artifacts') / 'plans').iterdir())
print(ditplan.runtime.__file__)
"""


@pytest.mark.slow
def test_wheel_installs_into_a_fresh_venv(tmp_path):
    dist = tmp_path / "dist"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(dist), str(ROOT)],
        check=True, cwd=tmp_path,
    )
    (wheel,) = dist.glob("ditplan-*.whl")
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    python = env_dir / "bin" / "python"
    subprocess.run([python, "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)],
                   check=True, cwd=tmp_path)
    out = subprocess.run([python, "-c", CHECK], check=True, cwd=tmp_path, capture_output=True,
                         text=True).stdout
    assert str(env_dir) in out  # imported from the fresh environment, not this checkout
