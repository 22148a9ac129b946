"""benchmarks.forward's CPU smoke run: dense, sparse, unfused q/k, estimated rows and profiles."""

from __future__ import annotations


def test_quick_forward_times_every_variant_and_profiles_each(tmp_path):
    from benchmarks.forward import main

    rows = main(["--quick", "--densities", "0.2", "--tiles", "1,4,4", "--repeats", "1",
                 "--backends", "torch", "--unfused-too", "--estimate-too",
                 "--profile", str(tmp_path)])
    assert [r["variant"] for r in rows] == [
        "dense", "sparse d=0.2 tile=1,4,4 torch", "sparse d=0.2 tile=1,4,4 torch estimated",
        "sparse d=0.2 tile=1,4,4 torch unfused q/k"]
    assert all(r["ms"] > 0 for r in rows)
    reports = sorted(tmp_path.glob("profile-*.txt"))
    assert len(reports) == 4
    dense = (tmp_path / "profile-dense.txt").read_text()
    assert "self CPU time by kind" in dense and "matmul" in dense
