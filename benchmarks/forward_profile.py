"""One forward under torch.profiler: its ops by self time and a breakdown by kind, as text."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

# Kinds by op or kernel name (lower case, first match wins): a convenience beside the exact op
# table, since kernel names are the libraries' own (NCCL, cuBLAS/CUTLASS, Triton, FlashAttention).
KINDS = (
    ("communication", ("nccl", "all_to_all", "alltoall", "c10d", "gloo", "broadcast",
                       "param_comms")),
    ("attention", ("flash", "fmha", "attention", "flex", "triton_tem", "sdpa", "softmax")),
    ("matmul", ("gemm", "matmul", "aten::mm", "aten::addmm", "aten::linear", "cutlass",
                "cublas", "xmma", "nvjet", "sm90")),
    ("copy", ("copy", "contiguous", "clone", "cat", "transpose", "permute", "index")),
)
TOP_OPS = 25


def kind_of(name: str) -> str:
    """The kind of an op or kernel by its name (``other`` when nothing matches)."""
    lower = name.lower()
    return next((kind for kind, marks in KINDS if any(m in lower for m in marks)), "other")


def profile_call(call: Callable[[], object], device: torch.device) -> str:
    """Run ``call`` once under the profiler; the report: self time per kind (device time on a
    GPU, CPU time otherwise) and the top ops."""
    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        call()
        if cuda:
            torch.cuda.synchronize()
    events = prof.key_averages()
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    totals = time_by_kind(events, cuda)
    whole = sum(totals.values()) or 1.0
    lines = [f"self {'device' if cuda else 'CPU'} time by kind (ms, share):"]
    lines += [f"  {kind:<14} {us / 1e3:10.2f} {us / whole:7.1%}"
              for kind, us in sorted(totals.items(), key=lambda kv: -kv[1])]
    lines += ["", events.table(sort_by=key, row_limit=TOP_OPS)]
    return "\n".join(lines)


def time_by_kind(events, cuda: bool) -> dict[str, float]:
    """Microseconds per kind over profiler rows (``key_averages()``). On a GPU only the kernels'
    rows count: a CPU op's row also carries the device time of the kernels it launched, so
    summing every row counted each kernel twice (aten::addmm and its cuBLAS kernel). On a CPU
    self CPU time counts, which excludes children. GPU user annotations (``nccl:all_to_all``, a
    span over its NCCL kernel on the device timeline) are skipped: they doubled communication."""
    totals: dict[str, float] = {}
    for event in events:
        if cuda and (event.device_type != DeviceType.CUDA
                     or getattr(event, "is_user_annotation", False)):
            continue
        time = event.self_device_time_total if cuda else event.self_cpu_time_total
        kind = kind_of(event.key)
        totals[kind] = totals.get(kind, 0.0) + float(time or 0.0)
    return totals


def write_profile(out_dir: str | Path, label: str, report: str) -> Path:
    """``report`` as ``out_dir/profile-<label>.txt`` (label made file-safe)."""
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in label)
    path = Path(out_dir) / f"profile-{safe}.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(report + "\n", encoding="utf-8")
    return path
