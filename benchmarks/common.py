"""Shared benchmark helpers: model shapes, timing with device events, environment banner."""

from __future__ import annotations

import statistics
import time

import torch

# Wan2.1-T2V-1.3B transformer config (diffusers layout), with random weights.
WAN_1_3B = dict(
    patch_size=(1, 2, 2),
    num_attention_heads=12,
    attention_head_dim=128,
    in_channels=16,
    out_channels=16,
    text_dim=4096,
    freq_dim=256,
    ffn_dim=8960,
    num_layers=30,
    cross_attn_norm=True,
    qk_norm="rms_norm_across_heads",
    eps=1e-6,
)
# 480p x 81 frames: 21 latent frames of 60 x 104 latents -> 21 x 30 x 52 = 32,760 tokens.
WAN_480P_LATENTS = (1, 16, 21, 60, 104)
WAN_TEXT_TOKENS = 512


def banner() -> str:
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return f"torch {torch.__version__} | device {device} | {time.strftime('%Y-%m-%d')}"


def time_ms(fn, *, warmup: int = 2, repeats: int = 5) -> float:
    """Median wall time of ``fn()`` in ms, with device events on CUDA."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def peak_memory_gib(fn) -> float:
    """Peak allocated device memory (GiB) while running ``fn()`` once; 0 on CPU."""
    if not torch.cuda.is_available():
        fn()
        return 0.0
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / 2**30


def graphs_compiled_by(fn) -> int:
    """How many new dynamo graphs one call of ``fn()`` compiled."""
    counters = torch._dynamo.utils.counters["stats"]
    before = counters["unique_graphs"]
    fn()
    return counters["unique_graphs"] - before


def compile_until_settled(call, max_calls: int, unit: str = "calls") -> tuple[int, int]:
    """Call ``call()`` (one call of a compiled model, returning how many new dynamo graphs it
    compiled) until a call compiles none, so that no recompilation lands in timed calls;
    (calls that compiled something, graphs they compiled). Fails if graphs are still new after
    ``max_calls`` calls (``unit`` names them in the message)."""
    graphs = 0
    for calls in range(max_calls):
        new = call()
        if new == 0:
            return calls, graphs
        graphs += new
    raise RuntimeError(f"torch.compile still compiled new graphs after {max_calls} {unit} "
                       "(a guard that changes every call); not timing it")


def timed_once(fn, device: str) -> tuple[float, float]:
    """(seconds, peak allocated GiB) of one synchronized call of ``fn()`` on ``device``;
    peak 0 off CUDA, as in peak_memory_gib."""
    cuda = device == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    fn()
    if cuda:
        torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0
    return time.perf_counter() - start, peak


def time_ms_and_peak(fn, *, warmup: int, repeats: int) -> tuple[float, float]:
    """:func:`time_ms` of ``fn`` and the peak allocated device memory (GiB) over all its calls,
    warm-up included; peak 0 on CPU."""
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    ms = time_ms(fn, warmup=warmup, repeats=repeats)
    return ms, torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0
