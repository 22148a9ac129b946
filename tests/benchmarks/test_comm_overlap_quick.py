"""benchmarks.comm_overlap's smoke run in two gloo ranks: every variant timed, rank 0 reports."""

from __future__ import annotations


def rank_benchmark():
    from benchmarks.comm_overlap import main

    return main(["--quick", "--layers", "2", "--repeats", "1"])


def test_quick_run_times_each_variant_on_rank_0(gloo_ranks):
    table, others = gloo_ranks.run(rank_benchmark)
    assert others == []
    assert [r["variant"] for r in table] == ["all-to-all x4", "q/k/v projections", "in line",
                                             "overlapped"]
    assert all(r["ms"] > 0 for r in table)
