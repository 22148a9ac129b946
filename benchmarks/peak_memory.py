"""What is alive at a forward's memory peak: CUDA allocation history replayed to the peak.

Usage: python -m benchmarks.peak_memory [--variants dense sparse] [--backend fa4] [--eager]
       [--compiled] [--top 25]
Builds the Wan2.1-1.3B-shaped transformer of ``benchmarks.forward`` (480p x 81 frames, bf16),
records the allocator's history around one no-grad forward per variant (eager and/or under
``torch.compile``, after its warm-up calls) and prints, at the peak, the live allocations made
during the forward grouped by the first two frames outside torch (for compiled code: inductor's
``bufN = empty_strided_cuda(...)`` line and the model line it came from). Needs a CUDA device.
"""

from __future__ import annotations

import argparse
import collections
import linecache
import time

import torch

from benchmarks.common import banner

MIB = 2**20


def live_at_peak(events: list[dict], base: int) -> tuple[int, dict[int, dict]]:
    """Replays allocator trace events; returns (peak bytes, {addr: alloc event} live then).

    Args:
        events: ``torch.cuda.memory._snapshot()["device_traces"]`` entries, in order.
        base: bytes allocated when recording began (allocations older than the trace).
    """
    current = peak = base
    live: dict[int, dict] = {}
    at_peak: dict[int, dict] = {}
    for event in events:
        if event["action"] == "alloc":
            live[event["addr"]] = event
            current += event["size"]
        elif event["action"] == "free_requested" and event["addr"] in live:
            current -= live.pop(event["addr"])["size"]
        if current > peak:
            peak, at_peak = current, dict(live)
    return peak, at_peak


def origin(frames: list[dict], depth: int = 2) -> str:
    """The first `depth` frames outside torch's own Python (inductor's generated code counts)."""
    out = []
    for frame in frames:
        path = frame["filename"]
        if "/torch/" in path and "torchinductor" not in path:
            continue
        text = linecache.getline(path, frame["line"]).strip()[:110]
        out.append(f"{path.rsplit('/', 1)[-1]}:{frame['line']} {text}")
        if len(out) == depth:
            break
    return " | ".join(out) or "(no Python frame)"


def report(label: str, forward, top: int) -> None:
    """Records one call of `forward` and prints what is live at its peak."""
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.memory._record_memory_history(max_entries=400_000, stacks="python")
    try:
        forward()
        torch.cuda.synchronize()
        snapshot = torch.cuda.memory._snapshot()
    finally:
        torch.cuda.memory._record_memory_history(enabled=None)
    events = [e for trace in snapshot["device_traces"] for e in trace]
    peak, live = live_at_peak(events, base)
    groups = collections.Counter()
    for event in live.values():
        groups[origin(event["frames"])] += event["size"]
    print(f"\n== {label}: before {base / MIB:.1f} MiB, peak {peak / MIB:.1f} MiB, "
          f"{len(live)} allocations of the forward live at the peak "
          f"({sum(e['size'] for e in live.values()) / MIB:.1f} MiB)", flush=True)
    for where, size in groups.most_common(top):
        print(f"  {size / MIB:9.2f} MiB  {where}")


def main(argv: list[str] | None = None) -> None:
    from benchmarks.forward import build, warm_up_compiled
    from ditplan.policy.plan import AttentionSpec
    from ditplan.runtime.apply import apply_sparse_attention

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="+", choices=["dense", "sparse"],
                        default=["dense", "sparse"])
    parser.add_argument("--backend", default="auto", help="sparse kernel backend")
    parser.add_argument("--density", type=float, default=0.2)
    parser.add_argument("--eager", action="store_true", help="report the eager forward")
    parser.add_argument("--compiled", action="store_true",
                        help="report the torch.compile'd forward (default when neither is given)")
    parser.add_argument("--top", type=int, default=25, help="groups to print per report")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("needs a CUDA device (the allocator history is CUDA's)")
    modes = [m for m in ("eager", "compiled") if getattr(args, m)] or ["compiled"]
    print(banner(), flush=True)
    model, inputs = build(False, "cuda", torch.bfloat16)

    def forward_of(module):
        def forward():
            with torch.no_grad():
                module(**inputs)
        return forward

    for variant in args.variants:
        handle = None
        if variant == "sparse":
            spec = AttentionSpec(density=args.density, tile=(1, 8, 8))
            handle = apply_sparse_attention(model, spec, backend=args.backend)
        forward_of(model)()  # first-use work (kernel builds, cached tables) out of the record
        if "eager" in modes:
            report(f"{variant} eager", forward_of(model), args.top)
        if "compiled" in modes:
            compiled = torch.compile(model)
            start = time.perf_counter()
            calls = warm_up_compiled(compiled, inputs, "cuda")
            print(f"{variant}: compiled in {time.perf_counter() - start:.0f} s "
                  f"({calls} compiling calls)", flush=True)
            report(f"{variant} compiled", forward_of(compiled), args.top)
            torch._dynamo.reset()
        if handle:
            handle.remove()


if __name__ == "__main__":
    main()
