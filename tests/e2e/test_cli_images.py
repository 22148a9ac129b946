"""FLUX.1 and Qwen-Image end to end through the CLI on tiny pipelines saved to disk: profile,
compile, run (images, embedded guidance vs true CFG), and the refusals."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from ditplan.policy.plan_io import load_plan
from ditplan.profiler.schema import read_traces
from ditplan.runtime.cli import main
from ditplan.runtime.loading import reference_model_dir
from tests.image_pipelines import saved_tiny_flux_pipeline, saved_tiny_qwenimage_pipeline

PROMPT = "a red circle"
# Per family: the saved pipeline and a workload of 8 x 16 image tokens (FLUX packs 2 x 2
# latent pixels of a scale-1 VAE, Qwen-Image 2 x 2 of a scale-4 one), 3 steps, attention
# statistics at step 1 only. FLUX.1-dev's guidance is embedded (one call per step);
# Qwen-Image's is true CFG (cond and uncond calls, text lengths differing per branch).
FAMILIES = {
    "flux": (saved_tiny_flux_pipeline, ["--height", "16", "--width", "32"], False),
    "qwenimage": (saved_tiny_qwenimage_pipeline, ["--height", "64", "--width", "128"], True),
}
WORKLOAD = ["--steps", "3", "--guidance-scale", "3.5"]


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, tmp_path_factory):
    """(name, pipeline folder, trace folder, plan file): profiled and compiled by the CLI."""
    save, size, _ = FAMILIES[request.param]
    root = tmp_path_factory.mktemp(request.param)
    model, traces, plan = save(root), root / "traces", root / "plan.json"
    assert main(["profile", "--model", str(model), "--out", str(traces), "--prompts", PROMPT,
                 "--block-size", "64", "--tile", "1x4x4", "--attention-steps", "1",
                 "--device", "cpu", "--no-progress", *WORKLOAD, *size]) == 0
    assert main(["compile-policy", str(traces), "--out", str(plan), "--quality", "fast",
                 "--density", "0.5", "--all-roles", "background"]) == 0
    return request.param, model, traces, plan


def test_profile_records_an_image_workload(family):
    name, _, traces, plan = family
    cfg = FAMILIES[name][2]
    workload = read_traces(traces).metadata.workload
    assert (workload.frames, workload.tokens_grid) == (1, (1, 8, 16))
    assert workload.cfg is cfg and workload.guidance_scale == 3.5
    assert load_plan(plan).workload.contexts == (("cond", "uncond") if cfg else ("cond",))
    assert (traces / "report.png").is_file()


def test_run_writes_an_image_and_compares_it(family, tmp_path, capsys):
    name, model, _, plan = family
    out = tmp_path / "run"
    assert main(["run", "--model", str(model), "--plan", str(plan), "--prompt", PROMPT,
                 "--device", "cpu", "--backend", "torch", "--out", str(out),
                 "--compare-dense"]) == 0
    assert f"wrote {out / 'image.png'}" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["dense_image.png", "image.png",
                                                    "metrics.json"]
    assert Image.open(out / "image.png").size == Image.open(out / "dense_image.png").size
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["output"] == "image.png" and metrics["workload"]["frames"] == 1
    assert 0 < metrics["run"]["attention_density"] < 1
    assert metrics["vs_dense"]["psnr_db"] > 10 and -1 <= metrics["vs_dense"]["ssim"] <= 1


def test_other_plans_and_frames_are_refused(family, tmp_path, capsys):
    _, model, traces, plan = family
    out = tmp_path / "run"
    wan_plan = reference_model_dir().parents[1] / "plans" / "ditplan-ref-t2v-fast.json"
    assert main(["run", "--model", str(model), "--plan", str(wan_plan), "--device", "cpu",
                 "--out", str(out)]) == 2
    assert "the plan is for a WanTransformer3DModel" in capsys.readouterr().err
    assert main(["run", "--model", "reference", "--plan", str(plan), "--device", "cpu",
                 "--out", str(out)]) == 2
    assert "this model is a WanTransformer3DModel" in capsys.readouterr().err
    assert main(["run", "--model", str(model), "--plan", str(plan), "--frames", "4",
                 "--device", "cpu", "--out", str(out)]) == 2
    assert "generates images: --frames 4 does not apply" in capsys.readouterr().err
    assert not out.exists()
    assert main(["profile", "--model", str(model), "--out", str(tmp_path / "traces"),
                 "--frames", "4", "--device", "cpu", "--no-progress", *WORKLOAD]) == 1
    assert "generates images" in capsys.readouterr().err
