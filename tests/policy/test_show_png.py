"""`plan show --png`: the drawing's size, its action colours and density shading, the CLI."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from ditplan.policy.plan import COMPUTE, FORECAST, REUSE
from ditplan.policy.plan_io import save_plan
from ditplan.policy.show_png import COLOURS, DPI, cell_colours, figure_inches, render_png, title
from ditplan.runtime.cli import main
from tests.policy.policy_factories import action_plan, sample_plan


def _pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).reshape(-1, 3).astype(int)


LEGEND_SWATCH = 200  # pixels of one colour's legend swatch; a cell has more than twice that


def _count(pixels: np.ndarray, colour) -> int:
    rgb = np.round(np.array(colour) * 255)
    return int((np.abs(pixels - rgb).max(axis=1) <= 2).sum())


@pytest.mark.parametrize("cfg", [True, False])
def test_png_has_the_expected_size(cfg):
    plan = action_plan(cfg=cfg)
    width, height = figure_inches(plan)
    image = Image.open(io.BytesIO(render_png(plan)))
    assert image.format == "PNG" and image.size == (round(width * DPI), round(height * DPI))


def test_png_shows_every_action_of_the_plan():
    pixels = _pixels(render_png(action_plan()))
    for action in (COMPUTE, REUSE, FORECAST):
        assert _count(pixels, COLOURS[action]) > 10 * LEGEND_SWATCH, action


def test_png_without_forecasts_has_no_forecast_cells():
    pixels = _pixels(render_png(sample_plan()))
    assert _count(pixels, COLOURS[REUSE]) > 10 * LEGEND_SWATCH
    assert _count(pixels, COLOURS[FORECAST]) <= LEGEND_SWATCH


def test_compute_cells_are_shaded_by_density():
    plan = sample_plan(steps=6)
    cells = cell_colours(plan, "uncond")
    full = pytest.approx(COLOURS[COMPUTE])
    assert cells[0][0] == full and cells[0][1] == full  # blocks.0: dense on steps 0-1
    assert cells[1][4] == full  # blocks.1 is dense on every step it computes
    sparse, lighter = cells[0][2], cells[3][2]  # density 0.2, then mass threshold
    assert all(s > f for s, f in zip(sparse, COLOURS[COMPUTE], strict=True))
    assert all(x > s for x, s in zip(lighter, sparse, strict=True))
    assert cells[1][3] == COLOURS[REUSE]  # blocks.1..2 reuse on odd steps from 3


def test_title_has_predicted_and_measured_speedup():
    assert "predicted 1.70x" in title(action_plan())
    assert "measured 1.80x, PSNR 31.2 dB" in title(action_plan())
    assert "measured" not in title(action_plan(calibrated=False))


def test_cli_writes_the_png_beside_the_table(tmp_path, capsys):
    plan_path = tmp_path / "plan.json"
    save_plan(action_plan(), plan_path)
    png = tmp_path / "new" / "folder" / "plan.png"
    assert main(["plan", "show", str(plan_path), "--png", str(png)]) == 0
    out = capsys.readouterr().out
    assert "steps C/R/F" in out and "C3 R3 F2 cond, C2 R4 F2 uncond" in out
    assert "measured on cpu (2 prompts): speedup 1.80x, PSNR 31.2 dB" in out  # batch unknown
    assert f"wrote {png}" in out
    assert Image.open(png).format == "PNG"
    assert [p.name for p in png.parent.iterdir()] == ["plan.png"]  # no temp file left


def test_cli_bad_png_path_is_a_clear_error(tmp_path, capsys):
    plan_path = tmp_path / "plan.json"
    save_plan(action_plan(), plan_path)
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    assert main(["plan", "show", str(plan_path), "--png", str(blocker / "plan.png")]) == 1
    assert f"error: cannot write --png {blocker / 'plan.png'}" in capsys.readouterr().err
