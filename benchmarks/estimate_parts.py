"""Time the dropped-block estimate's parts beside the sparse kernel, one layer (CUDA, flex).

Usage: python -m benchmarks.estimate_parts [--density 0.2] [--heads 12] [--tokens 32768]
Shape: the Wan2.1-1.3B layer at 480p x 81 (1 x 12 x 32,768 x 128, bf16), q/k/v as transposed
[B, S, H, D] views as the processors pass them. Prints ms per call (CUDA events, 20 calls).
"""

from __future__ import annotations

import argparse

import torch

from ditplan.runtime.kernels import dropped_blocks_attention, merge_attention, select_blocks
from ditplan.runtime.kernels.flex import flex_block_sparse_attention, flex_remainder_attention
from ditplan.runtime.kernels.remainder import block_means


def cuda_ms(fn, calls: int = 20) -> float:
    """Mean ms per call of ``fn`` after 3 warm-up calls."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(calls):
        fn()
    stop.record()
    torch.cuda.synchronize()
    return start.elapsed_time(stop) / calls


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--density", type=float, default=0.2)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--tokens", type=int, default=32768)
    args = parser.parse_args(argv)
    shape = (1, args.tokens, args.heads, 128)
    q, k, v = (torch.randn(shape, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
               for _ in range(3))  # [B, H, S, D] views
    block_map = select_blocks(q, k, block_size=128, density=args.density)
    out, lse = flex_block_sparse_attention(q, k, v, block_map, block_size=128, return_lse=True)
    k_mean, v_mean, log_count = block_means(k, v, 128)
    k_mean, v_mean = k_mean.to(q.dtype), v_mean.to(q.dtype)
    rest, rest_lse = flex_remainder_attention(q, k_mean, v_mean, log_count, block_map, 128)
    parts = {
        "sparse kernel": lambda: flex_block_sparse_attention(q, k, v, block_map, block_size=128),
        "sparse kernel with lse": lambda: flex_block_sparse_attention(
            q, k, v, block_map, block_size=128, return_lse=True),
        "block means": lambda: block_means(k, v, 128),
        "remainder flex call": lambda: flex_remainder_attention(q, k_mean, v_mean, log_count,
                                                                block_map, 128),
        "dropped_blocks_attention": lambda: dropped_blocks_attention(q, k, v, block_map, 128),
        "merge": lambda: merge_attention(out, lse, rest, rest_lse),
    }
    times = {name: cuda_ms(fn) for name, fn in parts.items()}
    for name, ms in times.items():
        print(f"{name:<28} {ms:7.3f} ms", flush=True)
    return times


if __name__ == "__main__":
    main()
