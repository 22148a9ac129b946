"""benchmarks.parallel's smoke run in two gloo ranks: every row, the W-rank outputs equal."""

from __future__ import annotations


def rank_benchmark():
    from benchmarks.parallel import main

    return main(["--quick", "--steps", "2", "--repeats", "1", "--chunks", "1", "2"])


def test_quick_run_times_dense_and_sparse_on_one_and_two_ranks(gloo_ranks):
    table, others = gloo_ranks.run(rank_benchmark)
    assert others == []  # only rank 0 reports
    assert [(r["variant"], r["gpus"]) for r in table] == [
        ("dense", 1), ("sparse d=0.2", 1), ("sparse d=0.2", 2), ("sparse d=0.2", 2), ("dense", 2)]
    assert [r.get("chunks") for r in table] == [None, None, 1, 2, None]
    for row in table:
        assert row["ms"] > 0 and row["loop_s"] > 0
        assert row["max_abs_diff"] < 1e-5 and row["loop_max_abs_diff"] < 1e-5
    # averaged over the ranks' heads; the pipelined chunks select alike
    assert table[1]["density"] == table[2]["density"] == table[3]["density"] < 1
    assert table[3]["vs_dense"] == table[4]["ms"] / table[3]["ms"]
