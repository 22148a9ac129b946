"""Benchmark: what the flex kernel costs at density 0.2 under different settings (H100/H200).

    python -m benchmarks.flex_variants      # CUDA only; Wan2.1-1.3B shape, bf16

One run, one card, the dense SDPA baseline first. The block map is ditplan's own (block-mean
top-k with the first-frame sink, tile 1x8x8). Cases: the runtime's BlockMask (partial last key
block with a mask_mod, S = 32,760); all blocks FULL with no mask_mod (the tail unmasked: wrong
numbers, timing only); q/k/v padded to S = 32,768 (divisible, no mask_mod) and the padding's
own cost; flex kernel options (USE_TMA, PRESCALE_QK, ROWS_GUARANTEED_SAFE) on both; and the
top-k / sort primitives the selection can use. This is how ditplan's defaults were chosen (TMA
on for Hopper and newer; no padding); results in BENCHMARKS.md.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ditplan.runtime.kernels import first_frame_mask, forced_blocks, select_blocks, tile_permutation
from ditplan.runtime.kernels.block_map import block_mean_scores
from ditplan.runtime.kernels.flex import _call_compiled, _kv_blocks, block_mask_from_map

BLOCK_SIZE, DENSITY = 128, 0.2
GRID, HEADS, HEAD_DIM = (21, 30, 52), 12, 128  # S = 32,760
PAD = 8  # 32,760 + 8 = 32,768 = 256 blocks of 128
OPTIONS = ({"USE_TMA": True}, {"PRESCALE_QK": True},
           {"ROWS_GUARANTEED_SAFE": True},
           {"USE_TMA": True, "ROWS_GUARANTEED_SAFE": True, "PRESCALE_QK": True})


def bench(name: str, fn) -> None:
    from triton.testing import do_bench

    try:
        ms = do_bench(fn, warmup=30, rep=200, return_mode="median")
        print(f"{name:<64} {ms:8.3f} ms", flush=True)
    except Exception as error:  # an option this torch or card rejects: say so, go on
        print(f"{name:<64} failed: {type(error).__name__}: {str(error)[:120]}", flush=True)


def main() -> None:
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks.flex_variants needs a CUDA GPU")
    from torch.nn.attention.flex_attention import BlockMask

    torch.manual_seed(0)
    seq_len = GRID[0] * GRID[1] * GRID[2]
    q, k, v = (torch.randn(1, HEADS, seq_len, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
               for _ in range(3))  # [1, H, S, D] each
    perm = tile_permutation(GRID, (1, 8, 8), device="cuda")
    forced = forced_blocks(seq_len, BLOCK_SIZE, device="cuda",
                           sink_tokens=first_frame_mask(GRID, device="cuda")[perm])
    block_map = select_blocks(q, k, block_size=BLOCK_SIZE, density=DENSITY, forced=forced)
    counts, indices = _kv_blocks(block_map)  # [1, H, Qb], [1, H, Qb, Kb]

    def full_blocks(length: int) -> BlockMask:
        return BlockMask.from_kv_blocks(torch.zeros_like(counts), indices, counts, indices,
                                        BLOCK_SIZE=BLOCK_SIZE, seq_lengths=(length, length),
                                        compute_q_blocks=False)

    def flex(qq, kk, vv, mask, options=None):
        return _call_compiled(qq, kk, vv, block_mask=mask, scale=None, kernel_options=options)

    print(f"torch {torch.__version__} on {torch.cuda.get_device_name()}; S={seq_len}, "
          f"density computed {block_map.float().mean().item():.3f}")
    bench(f"dense SDPA S={seq_len}", lambda: F.scaled_dot_product_attention(q, k, v))
    runtime_mask = block_mask_from_map(block_map, seq_len, BLOCK_SIZE)
    padded = [F.pad(x, (0, 0, 0, PAD)) for x in (q, k, v)]  # [1, H, S + PAD, D]
    padded_mask = full_blocks(seq_len + PAD)
    no_tma = {"USE_TMA": False}  # flex's own default (ditplan turns TMA on for Hopper)
    bench("runtime BlockMask (partial tail + mask_mod), TMA off",
          lambda: flex(q, k, v, runtime_mask, no_tma))
    bench("all FULL blocks, no mask_mod (tail unmasked, timing only), TMA off",
          lambda: flex(q, k, v, full_blocks(seq_len), no_tma))
    bench(f"padded to S={seq_len + PAD}, all FULL, TMA off",
          lambda: flex(*padded, padded_mask, no_tma))
    bench("  the padding itself (F.pad of q, k, v)",
          lambda: [F.pad(x, (0, 0, 0, PAD)) for x in (q, k, v)])
    for options in OPTIONS:
        bench(f"runtime BlockMask {options}", lambda o=options: flex(q, k, v, runtime_mask, o))
        bench(f"padded {options}", lambda o=options: flex(*padded, padded_mask, o))
    scores = block_mean_scores(q, k, block_size=BLOCK_SIZE)  # [1, H, Qb, Kb]
    budget = round(DENSITY * scores.shape[-1])
    bench(f"topk({budget}) sorted", lambda: scores.topk(budget, dim=-1))
    bench(f"topk({budget}) unsorted", lambda: scores.topk(budget, dim=-1, sorted=False))
    bench("argsort of the bool map (how BlockMask indices were built)",
          lambda: torch.argsort(block_map.to(torch.int8), dim=-1, descending=True, stable=True))
    bench("_kv_blocks: counts and indices by running count (how they are built now)",
          lambda: _kv_blocks(block_map))


if __name__ == "__main__":
    main()
