"""HunyuanVideo and HunyuanVideo-1.5 end to end through the CLI on tiny pipelines saved to disk:
profile, compile, run (a video, compared with dense), and plans refused across families."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest

from ditplan.policy.plan_io import load_plan
from ditplan.profiler.schema import read_traces
from ditplan.runtime.cli import main
from tests.video_pipelines import (
    saved_tiny_hunyuan_video15_pipeline,
    saved_tiny_hunyuan_video_pipeline,
)

PROMPT = "a red circle"


class Family(NamedTuple):
    save: Callable[[Path], Path]
    height: int
    width: int
    grid: tuple[int, int, int]  # tokens: frames x rows x cols
    text_len: int  # text tokens of the joint sequence
    cfg: bool
    transformer: str


# Five frames make a 2 or 3 x 8 x 16 token grid (HunyuanVideo's VAE: 4x temporal, 8x spatial;
# the tiny HV1.5 VAE: 2x, 4x; patch 1). HunyuanVideo embeds its guidance (one call per step;
# Llama text padded to 256 tokens); HunyuanVideo-1.5's guider runs CFG at the CLI's scale
# (1000 Qwen + 256 ByT5 + 729 image tokens, most of them padding).
FAMILIES = {
    "hunyuan_video": Family(saved_tiny_hunyuan_video_pipeline, 64, 128, (2, 8, 16), 256, False,
                            "HunyuanVideoTransformer3DModel"),
    "hunyuan_video15": Family(saved_tiny_hunyuan_video15_pipeline, 32, 64, (3, 8, 16),
                              1000 + 256 + 729, True, "HunyuanVideo15Transformer3DModel"),
}
WORKLOAD = ["--steps", "3", "--frames", "5", "--guidance-scale", "6"]


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, tmp_path_factory):
    """(name, pipeline folder, trace folder, plan file): profiled and compiled by the CLI."""
    spec = FAMILIES[request.param]
    root = tmp_path_factory.mktemp(request.param)
    model, traces, plan = spec.save(root), root / "traces", root / "plan.json"
    assert main(["profile", "--model", str(model), "--out", str(traces), "--prompts", PROMPT,
                 "--block-size", "64", "--tile", "1x4x4", "--attention-steps", "1",
                 "--device", "cpu", "--no-progress", *WORKLOAD, "--height", str(spec.height),
                 "--width", str(spec.width)]) == 0
    assert main(["compile-policy", str(traces), "--out", str(plan), "--quality", "fast",
                 "--density", "0.5", "--all-roles", "background"]) == 0
    return request.param, model, traces, plan


def test_profile_records_a_video_workload_with_its_text(family):
    name, _, traces, plan = family
    spec = FAMILIES[name]
    metadata = read_traces(traces).metadata
    assert (metadata.workload.frames, metadata.workload.tokens_grid) == (5, spec.grid)
    assert metadata.workload.cfg is spec.cfg and metadata.workload.guidance_scale == 6.0
    assert metadata.model_config.text_len == spec.text_len
    # the sigmas the generation ran: both pipelines pass 1, 2/3, 1/3, which the scheduler
    # shifts by 7 (not its own default schedule)
    linear = np.linspace(1.0, 0.0, 4)[:-1]
    assert metadata.workload.sigmas == pytest.approx(7 * linear / (1 + 6 * linear))
    assert load_plan(plan).workload.contexts == (("cond", "uncond") if spec.cfg else ("cond",))
    assert (traces / "report.png").is_file()


def test_run_writes_a_video_and_compares_it(family, tmp_path, capsys):
    name, model, _, plan = family
    spec = FAMILIES[name]
    out = tmp_path / "run"
    assert main(["run", "--model", str(model), "--plan", str(plan), "--prompt", PROMPT,
                 "--device", "cpu", "--backend", "torch", "--out", str(out),
                 "--compare-dense"]) == 0
    assert f"wrote {out / 'video.mp4'}" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["dense_frames.png", "frames.png",
                                                    "metrics.json", "video.mp4"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["workload"] == dict(steps=3, height=spec.height, width=spec.width, frames=5,
                                       guidance_scale=6.0)
    assert 0 < metrics["run"]["attention_density"] < 1
    assert metrics["run"]["blocks_skipped_share"] > 0  # the plan's background runs reuse
    assert metrics["vs_dense"]["psnr_db"] > 10 and -1 <= metrics["vs_dense"]["ssim"] <= 1


def test_the_other_familys_plan_is_refused(family, tmp_path, capsys):
    name, _, _, plan = family
    other = next(spec for n, spec in FAMILIES.items() if n != name)
    out = tmp_path / "run"
    assert main(["run", "--model", str(other.save(tmp_path)), "--plan", str(plan),
                 "--device", "cpu", "--out", str(out)]) == 2
    assert (f"the plan is for a {FAMILIES[name].transformer}, this model is a "
            f"{other.transformer}") in capsys.readouterr().err
    assert not out.exists()
