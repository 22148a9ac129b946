"""``python -m benchmarks.quality --workload long --quick`` end to end on a tiny stand-in of the
long model whose attention is local, so the compiler chooses sparse layers (CPU, seconds)."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from benchmarks.quality import cli
from benchmarks.quality.results import read_rows
from ditplan.profiler.config import DEFAULT_PROMPTS
from ditplan.reference.attributes import captions_for, heldout_attributes

# 4 frames x 16 x 16 px -> 4 x 8 x 8 tokens = 4 blocks of 64 (one frame each); 4 steps with CFG.
WORKLOAD = ["--frames", "4", "--height", "16", "--width", "16", "--block-size", "64"]
METHODS = ["dense/baseline", "dense/repeat", "ditplan-sparse-only/d=0.2",
           "sparse-every-layer/d=0.2", "rainfusion2/d=0.2",
           "ditplan/fast", "ditplan/target=1.5x", "ditplan-cache-only/fast",
           "ditplan-cache-only/target=1.5x", "ditplan-mixed-heads/fast",
           "ditplan-mixed-heads-sparse-only/balanced", "sparse-every-layer-estimated/d=0.2",
           "sparse-every-layer-estimated-all/d=0.2", "ditplan-estimated/fast",
           "ditplan-estimated-all/fast"]
VERDICTS = ("**met**", "**missed**", "**not measured**")


def local_attention_pipeline(folder: Path) -> Path:
    """The tiny reference pipeline (the long preset's architecture family at the smoke size) with
    every self-attention's queries and keys one constant vector: with RoPE, each token then
    attends to its neighbours, which block-sparse attention can keep."""
    from tests.factories import tiny_reference_pipeline

    pipe = tiny_reference_pipeline()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for block in pipe.transformer.blocks:
            attn = block.attn1
            constant = torch.randn(attn.to_q.out_features, generator=generator)
            for proj, norm in ((attn.to_q, attn.norm_q), (attn.to_k, attn.norm_k)):
                proj.weight.zero_()
                proj.bias.copy_(constant)
                norm.weight.fill_(3.0)  # sharper softmax: most mass on the nearest tokens
    path = folder / "tiny-long"
    pipe.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def args(tmp_path_factory):
    model = local_attention_pipeline(tmp_path_factory.mktemp("model"))
    out = tmp_path_factory.mktemp("bench") / "out"
    return ["--out", str(out), "--workload", "long", "--quick", "--model", str(model),
            "--device", "cpu", *WORKLOAD, "--log-level", "WARNING"]


@pytest.fixture(scope="module")
def out(args):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: threads cost more than they give (2.5x when busy)
    try:
        assert cli.main(args) == 0
    finally:
        torch.set_num_threads(threads)
    return Path(args[1])


def test_the_part3_set_ran_in_catalog_order(out):
    rows = read_rows(out / "quality.jsonl")
    assert [r["method"] for r in rows] == METHODS
    assert all(r["status"] == "ok" and r["suite"] == "long" for r in rows), rows
    by_method = {r["method"]: r for r in rows}
    sparse = by_method["ditplan-sparse-only/d=0.2"]
    assert sparse["stats"]["sparse_layers"] and sparse["stats"]["attention_density"] < 1.0
    assert sparse["stats"]["blocks_skipped_share"] == 0.0  # sparse attention alone
    every = by_method["sparse-every-layer/d=0.2"]
    assert set(every["stats"]["sparse_layers"]) > set(sparse["stats"]["sparse_layers"])
    assert every["stats"]["blocks_skipped_share"] == 0.0
    for name in ("ditplan-cache-only/fast", "ditplan-cache-only/target=1.5x"):
        stats = by_method[name]["stats"]
        assert stats["attention_density"] == 1.0 and stats["blocks_skipped_share"] > 0.0
        assert by_method[name]["params"]["fixed_density"] == 1.0
    assert by_method["rainfusion2/d=0.2"]["params"]["sink"] is True
    estimated = by_method["sparse-every-layer-estimated/d=0.2"]
    assert estimated["params"]["estimate_dropped"] == "measured"
    every_head = by_method["sparse-every-layer-estimated-all/d=0.2"]
    assert every_head["stats"]["estimated_heads"] == 2 * len(every["stats"]["sparse_layers"])
    assert every_head["psnr_db_mean"] != every["psnr_db_mean"]  # same blocks, dropped estimated
    assert estimated["stats"]["sparse_layers"] == every["stats"]["sparse_layers"]
    assert by_method["ditplan-estimated-all/fast"]["params"]["estimate_dropped"] == "all"
    if estimated["stats"]["estimated_heads"]:  # heads the profiled errors say it helps
        assert estimated["psnr_db_mean"] != every["psnr_db_mean"]
    else:  # no head: the plain row's plan, not generated again
        assert estimated["same_plan_as"] == "sparse-every-layer/d=0.2"
    # a plan that an earlier row ran is not generated again: the later row names that row
    first_of = {}
    for r in rows:
        if r.get("plan_key"):
            earlier = first_of.setdefault(r["plan_key"], r)
            assert r.get("same_plan_as") == (None if earlier is r else earlier["method"])
            assert r["speedup"] == earlier["speedup"] and r["stats"] == earlier["stats"]


def test_plans_come_from_sampled_traces_of_training_captions(out):
    (manifest,) = (out / "traces").glob("*/manifest.json")
    arguments = json.loads(manifest.read_text())["arguments"]
    assert arguments["mode"] == "sample" and arguments["attention_steps"] == [0, 1, 2, 3]
    assert arguments["map_steps"] == []  # no block maps: the long traces stay small to ship
    maps = (manifest.parent / "traces" / "attention_maps").glob("*.parquet")
    assert all(pq.read_metadata(path).num_rows == 0 for path in maps)
    assert tuple(arguments["prompts"]) == DEFAULT_PROMPTS
    assert not set(arguments["prompts"]) & set(captions_for(heldout_attributes()))


def test_table_states_the_goals(out):
    table = (out / "table.md").read_text()
    lines = table.split("Issue 15's goals")[1].strip().splitlines()[1:]
    assert len(lines) == 2 and all(any(v in line for v in VERDICTS) for line in lines)
    assert "ditplan-sparse-only/d=0.2: cosine" in lines[0] and "sparse layers: blocks." in lines[0]


def test_missing_long_model_is_refused_before_anything_is_written(out, monkeypatch, tmp_path,
                                                                   capsys):
    monkeypatch.setattr(cli, "long_model_dir", lambda: tmp_path / "untrained")
    never = tmp_path / "never"
    for extra in ([], ["--scale", "wan1.3b"]):
        with pytest.raises(SystemExit) as exit_info:
            cli.main(["--out", str(never), "--workload", "long", "--device", "cpu", *extra])
        assert exit_info.value.code == 2
    assert "train it: tools/train_reference.py --long" in capsys.readouterr().err
    assert not never.exists()
    # the report needs only the rows
    assert cli.main(["--out", str(out), "--workload", "long", "--report-only"]) == 0


def test_scale_is_refused_for_the_long_workload(args, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main([*args, "--scale", "wan1.3b"])
    assert exit_info.value.code == 2
    assert "the long workload is measured at its own size" in capsys.readouterr().err


def test_rainfusion_keeps_its_published_tile_whatever_the_workload_tile(tmp_path):
    # With the sink on, the workload's 8 x 4 x 4 would force the whole first 8-frame tile-frame
    # (16.4 dB on the long model, session 20); the paper tiles 8 x 8 within each frame.
    from benchmarks.quality.catalog import CatalogContext
    from benchmarks.quality.long_catalog import build_long_methods
    from benchmarks.quality.workload import LONG

    def never(*args):
        raise AssertionError("building the methods must not profile or calibrate")

    ctx = CatalogContext(steps=LONG.steps, block_size=LONG.block_size, tile=LONG.tile,
                         backend="torch", dtype=torch.float32, timesteps=[], mag_ratios=[],
                         trace_dir=never, calibrator=never, plans_dir=tmp_path)
    assert LONG.tile == (8, 4, 4)
    (published,) = [m for m in build_long_methods(ctx, quick=False) if m.family == "rainfusion2"]
    assert published.params["tile"] == [1, 8, 8] and published.params["sink"] is True


def test_calibrated_caching_only_compiles_with_dense_attention(tmp_path, monkeypatch):
    """The calibrated caching-only rows search the same plan space with attention forced dense
    (nothing is compiled or measured here: the compile is intercepted)."""
    from benchmarks.quality import plans
    from benchmarks.quality.methods import NotApplicable
    from ditplan.policy.config import CompilerError

    seen = {}

    def intercepted(trace_dir, config, calibrate=None):
        seen.update(config=config, calibrate=calibrate)
        raise CompilerError("intercepted")

    monkeypatch.setattr(plans, "compile_policy", intercepted)
    method = plans.calibrated_method(3.0, lambda: tmp_path, calibrator=lambda pipe: "measure",
                                     plans_dir=tmp_path, backend="torch", candidates=8,
                                     refine=(0, 1), family="ditplan-cache-only-calibrated",
                                     forced={"fixed_density": 1.0})
    assert method.name == "ditplan-cache-only-calibrated/target=3x"
    assert method.params["fixed_density"] == 1.0
    with pytest.raises(NotApplicable, match="intercepted"):
        method.install(object())
    config = seen["config"]
    assert config.fixed_density == 1.0 and config.target_speedup == 3.0
    assert config.calibrate_candidates == 8 and seen["calibrate"] == "measure"


def test_saved_plans_run_as_they_are(out, args, tmp_path):
    """--plan-files: a saved plan runs unchanged beside dense (only it, without --methods), and
    its row names the file."""
    from ditplan.policy.compiler import compile_policy
    from ditplan.policy.config import CompilerConfig
    from ditplan.policy.plan_io import save_plan

    (traces,) = (p.parent for p in (out / "traces").glob("*/manifest.json"))
    plan = compile_policy(traces, CompilerConfig.from_name("fast"))
    save_plan(plan, tmp_path / "shared-fast.json")
    fresh = tmp_path / "run"
    assert cli.main(["--out", str(fresh), *args[2:],
                     "--plan-files", str(tmp_path / "shared-fast.json")]) == 0
    rows = {r["method"]: r for r in read_rows(fresh / "quality.jsonl")}
    assert list(rows) == ["dense/baseline", "plan-file/shared-fast"]
    row = rows["plan-file/shared-fast"]
    assert row["status"] == "ok" and row["params"]["plan_file"].endswith("shared-fast.json")
    # the same plan as the catalog's ditplan/fast row: the same clips
    catalog = {r["method"]: r for r in read_rows(out / "quality.jsonl")}["ditplan/fast"]
    assert row["psnr_db_mean"] == pytest.approx(catalog["psnr_db_mean"], abs=1e-6)


def test_bad_plan_files_are_refused_before_anything_is_written(args, tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    twin = tmp_path / "other"
    twin.mkdir()
    never = tmp_path / "never"
    cases = ([str(bad)], [str(tmp_path / "missing.json")], [str(bad), str(twin / "bad.json")])
    for files in cases:
        with pytest.raises(SystemExit) as exit_info:
            cli.main(["--out", str(never), *args[2:], "--plan-files", *files])
        assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "bad.json" in err and "does not exist" in err and "share a name (bad)" in err
    assert not never.exists()
