"""Time the dropped-block estimate's parts beside the sparse kernel, one layer (CUDA, flex).

Usage: python -m benchmarks.estimate_parts [--density 0.2] [--heads 12] [--tokens 32760] [--sweep]
Shape: the Wan2.1-1.3B layer at 480p x 81 (1 x 12 x 32,760 x 128, bf16: a partial last block),
q/k/v as transposed [B, S, H, D] views as the processors pass them. Prints ms per call (CUDA
events, 20 calls); ``--sweep`` also times the estimate kernel's tile settings.
"""

from __future__ import annotations

import argparse
import functools
import itertools

import torch

from ditplan.runtime.kernels import estimate_dropped_blocks, merge_attention, select_blocks
from ditplan.runtime.kernels.flex import flex_block_sparse_attention
from ditplan.runtime.kernels.remainder import block_means, remainder_attention


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


def kernel_configs(q, k, v, block_map, out, lse) -> dict:
    """The estimate kernel alone (means precomputed) at each tile setting, by name."""
    from ditplan.runtime.kernels import triton_remainder

    k_mean, v_mean, log_count = (x.to(q.dtype) if x.dim() == 4 else x
                                 for x in block_means(k, v, 128))
    heads = [True] * q.shape[1]
    scale = q.shape[-1] ** -0.5
    configs = {}
    for block_m, block_n, warps, stages in itertools.product((64, 128), (32, 64, 128), (4, 8),
                                                             (1, 2, 3)):
        config = dict(BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps, num_stages=stages)
        name = f"kernel M{block_m} N{block_n} w{warps} s{stages}"
        configs[name] = functools.partial(triton_remainder.launch, q, k_mean, v_mean, log_count,
                                          block_map, heads, out, lse, 128, scale, config)
    return configs


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--density", type=float, default=0.2)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--tokens", type=int, default=32760)
    parser.add_argument("--sweep", action="store_true", help="time the kernel's tile settings")
    args = parser.parse_args(argv)
    shape = (1, args.tokens, args.heads, 128)
    q, k, v = (torch.randn(shape, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
               for _ in range(3))  # [B, H, S, D] views
    block_map = select_blocks(q, k, block_size=128, density=args.density)
    out, lse = flex_block_sparse_attention(q, k, v, block_map, block_size=128, return_lse=True)
    k_mean, v_mean, log_count = block_means(k, v, 128)  # float32, as the twin takes them
    rest, rest_lse = remainder_attention(q, k_mean, v_mean, log_count, block_map, 128)
    parts = {
        "sparse kernel": lambda: flex_block_sparse_attention(q, k, v, block_map, block_size=128),
        "sparse kernel with lse": lambda: flex_block_sparse_attention(
            q, k, v, block_map, block_size=128, return_lse=True),
        "block means": lambda: block_means(k, v, 128),
        "estimate (means + kernel)": lambda: estimate_dropped_blocks(
            q, k, v, block_map, out, lse, block_size=128),
        "twin: pooled attention": lambda: remainder_attention(q, k_mean, v_mean, log_count,
                                                              block_map, 128),
        "twin: merge": lambda: merge_attention(out, lse, rest, rest_lse),
    }
    if args.sweep:
        parts.update(kernel_configs(q, k, v, block_map, out, lse))
    times = {name: cuda_ms(fn) for name, fn in parts.items()}
    for name, ms in times.items():
        print(f"{name:<28} {ms:7.3f} ms", flush=True)
    return times


if __name__ == "__main__":
    main()
