"""benchmarks.parallel's smoke run in two gloo ranks: every row, the W-rank outputs equal."""

from __future__ import annotations

import pytest


def rank_benchmark(profile_dir: str):
    from benchmarks.parallel import main

    return main(["--quick", "--steps", "2", "--repeats", "1", "--chunks", "1", "2",
                 "--profile", profile_dir])


def test_quick_run_times_dense_and_sparse_on_one_and_two_ranks(gloo_ranks, tmp_path):
    table, others = gloo_ranks.run(rank_benchmark, str(tmp_path))
    assert others == []  # only rank 0 reports
    assert [(r["variant"], r["gpus"]) for r in table] == [
        ("dense", 1), ("sparse d=0.2", 1), ("sparse d=0.2", 2), ("sparse d=0.2", 2), ("dense", 2)]
    assert [r.get("chunks") for r in table] == [None, None, 1, 2, None]
    for row in table:
        assert row["ms"] > 0 and row["loop_s"] > 0
        assert row["max_abs_diff"] < 1e-5 and row["loop_max_abs_diff"] < 1e-5
        assert row["max_abs_out"] == table[0 if row["variant"] == "dense" else 1]["max_abs_out"] > 0
    # averaged over the ranks' heads; the pipelined chunks select alike
    assert table[1]["density"] == table[2]["density"] == table[3]["density"] < 1
    assert table[3]["vs_dense"] == table[4]["ms"] / table[3]["ms"]
    # --profile: one report per row, by rank 0; the 2-rank rows spend time communicating
    names = sorted(p.name for p in tmp_path.glob("profile-*.txt"))
    assert names == ["profile-dense-1gpu.txt", "profile-dense-2gpu.txt",
                     "profile-sparse_d_0.2-1gpu.txt", "profile-sparse_d_0.2-2gpu-chunks1.txt",
                     "profile-sparse_d_0.2-2gpu-chunks2.txt"]
    two_ranks = (tmp_path / "profile-sparse_d_0.2-2gpu-chunks1.txt").read_text()
    one_rank = (tmp_path / "profile-sparse_d_0.2-1gpu.txt").read_text()
    assert "communication" in two_ranks and "communication" not in one_rank
    assert "self CPU time by kind" in one_rank and "aten::" in one_rank


def test_op_kinds_by_name():
    from benchmarks.forward_profile import kind_of

    assert kind_of("ncclDevKernel_SendRecv") == "communication"
    assert kind_of("c10d::alltoall_base_") == "communication"
    assert kind_of("triton_tem_fused_flex_attention_0") == "attention"
    assert kind_of("aten::addmm") == "matmul"
    assert kind_of("aten::copy_") == "copy"
    assert kind_of("aten::add") == "other"


def test_device_time_by_kind_counts_each_kernel_once():
    from types import SimpleNamespace

    from torch.autograd import DeviceType

    from benchmarks.forward_profile import time_by_kind

    def row(key, device_type, self_device, self_cpu, annotation=False):
        return SimpleNamespace(key=key, device_type=device_type, is_user_annotation=annotation,
                               self_device_time_total=self_device, self_cpu_time_total=self_cpu)

    # the op's row carries its kernel's device time as well as the kernel's own row does; so
    # does the GPU annotation NCCL's collectives put over their kernels (session 13's profile)
    rows = [row("aten::addmm", DeviceType.CPU, 117.0, 9.0),
            row("nvjet_sm90_tst_256x152", DeviceType.CUDA, 116.0, 0.0),
            row("FlashAttnFunc", DeviceType.CPU, 67.5, 7.0),
            row("kernel_cutlass_flash_fwd_sm90", DeviceType.CUDA, 67.5, 0.0),
            row("record_param_comms", DeviceType.CPU, 53.3, 10.1),
            row("ncclDevKernel_SendRecv", DeviceType.CUDA, 53.2, 0.0),
            row("nccl:all_to_all", DeviceType.CUDA, 53.2, 0.0, annotation=True)]
    assert time_by_kind(rows, cuda=True) == {"matmul": 116.0, "attention": 67.5,
                                             "communication": 53.2}
    assert time_by_kind(rows, cuda=False) == {"matmul": 9.0, "attention": 7.0,
                                              "communication": 10.1}


def rank_benchmark_compiled(scope: str):
    from benchmarks.parallel import main

    # the dense backend: no host syncs, so no graph breaks inside attention (as flex on a GPU)
    return main(["--quick", "--compile", scope, "--backend", "dense", "--repeats", "1",
                 "--chunks", "1"])


@pytest.mark.parametrize("scope", ["model", "blocks"])
def test_quick_compiled_run_traces_every_row_and_matches_eager(gloo_ranks, scope):
    """--compile on CPU: dynamo (eager backend) traces the model (or, "blocks", each
    transformer block: nothing else would compile then) under diffusers' Ulysses with
    ditplan's sparse attention, the ranks warm up in step, and the outputs stay one GPU's.
    diffusers' context-parallel hooks break the graph, so each block is a frame of its own:
    when the sparse layers read the step there, every call recompiled (warm-up never ended);
    they read the tracker listener's dense-or-sparse bool instead."""
    table, others = gloo_ranks.run(rank_benchmark_compiled, scope)
    assert others == []
    assert [(r["variant"], r["gpus"]) for r in table] == [
        ("dense", 1), ("sparse d=0.2", 1), ("sparse d=0.2", 2), ("dense", 2)]
    for row in table:
        assert row["compiling_calls"] >= 1 and row["graphs"] >= 1 and row["compile_s"] > 0
        assert row["max_abs_diff"] < 1e-5
