"""The end-to-end benchmark's CPU smoke run: profile -> flag-made plans -> timed generations."""

from __future__ import annotations

import torch

from benchmarks.end_to_end import main
from ditplan.policy.plan_io import load_plan


def test_quick_run_profiles_compiles_from_flags_and_times_every_variant(tmp_path):
    result = main(["--out", str(tmp_path), "--quick", "--steps", "5", "--foreground", "0",
                   "--step-target", "1.5", "--json", str(tmp_path / "rows.json")])
    rows = {r["variant"]: r for r in result["rows"]}
    assert set(rows) == {"dense", "plan d=0.2 + caching", "plan d=0.2, sparse only",
                         "plan d=0.2 + step runs 1.5x"}
    assert all(r["seconds"] > 0 for r in rows.values())
    cached, sparse = rows["plan d=0.2 + caching"], rows["plan d=0.2, sparse only"]
    assert cached["blocks_skipped_share"] > 0 and sparse["blocks_skipped_share"] == 0
    assert sparse["attention_density"] < 1.0  # sparse steps ran with fewer blocks than dense
    plan = load_plan(tmp_path / "plan_d0.2_+_caching.json")
    assert plan.workload.steps == 5 and plan.runs
    assert (tmp_path / "rows.json").is_file()
    stepped = load_plan(tmp_path / "plan_d0.2_+_step_runs_1.5x.json")
    assert stepped.provenance.predicted_speedup >= 1.5
    assert rows["plan d=0.2 + step runs 1.5x"]["blocks_skipped_share"] > 0


def test_quick_compiled_run_warms_up_every_variant_and_skips_the_same_blocks(tmp_path):
    # dynamo's eager backend on CPU: dense compiled per block, each plan through
    # apply_plan(compile=...); the plans' schedules do not change under compilation
    args = ["--quick", "--steps", "5", "--foreground", "0", "--step-target", "1.5"]
    torch.manual_seed(0)  # the same random model, so the same traces and plans
    eager = {r["variant"]: r for r in main(["--out", str(tmp_path / "eager"), *args])["rows"]}
    torch.manual_seed(0)
    compiled = main(["--out", str(tmp_path / "compiled"), *args, "--compile"])["rows"]
    assert [r["variant"] for r in compiled] == list(eager)
    for row in compiled:
        assert row["graphs"] >= 1 and row["warm_up_generations"] >= 2  # the last adds none
        for key in ("blocks_skipped_share", "attention_density"):
            assert row.get(key) == eager[row["variant"]].get(key), (row["variant"], key)
