"""The end-to-end benchmark's CPU smoke run: profile -> flag-made plans -> timed generations."""

from __future__ import annotations

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
