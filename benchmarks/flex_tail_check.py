"""Which way of handing FlexAttention a partial last block is exact on this GPU and torch.

Usage: python -m benchmarks.flex_tail_check
Compares, against a float64 masked reference, three BlockMask constructions on shapes whose
sequence length is not a multiple of the block size: all kept blocks FULL (flex's own boundary
masking), tail blocks PARTIAL with mask_mod kv_idx < S, and padding to a block multiple with the
padded keys masked by a PARTIAL tail block.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from ditplan.runtime.kernels.reference import masked_attention_reference

FLEX = torch.compile(flex_attention, dynamic=False)


def kv_blocks(block_map):
    counts = block_map.sum(dim=-1, dtype=torch.int32)
    order = torch.argsort(block_map.to(torch.int8), dim=-1, descending=True, stable=True)
    return counts, order.to(torch.int32)


@functools.cache
def keys_before(seq_len):
    def mask_mod(b, h, q_idx, kv_idx):
        return kv_idx < seq_len

    return mask_mod


def mask_full(block_map, seq_len, bs):
    counts, idx = kv_blocks(block_map)
    return BlockMask.from_kv_blocks(torch.zeros_like(counts), torch.zeros_like(idx), counts, idx,
                                    BLOCK_SIZE=bs, seq_lengths=(seq_len, seq_len))


def mask_partial_tail(block_map, seq_len, bs, padded_len=None):
    full = block_map.clone()
    full[..., -1] = False
    fc, fi = kv_blocks(full)
    pc, pi = kv_blocks(block_map & ~full)
    length = padded_len or seq_len
    return BlockMask.from_kv_blocks(pc, pi, fc, fi, BLOCK_SIZE=bs, mask_mod=keys_before(seq_len),
                                    seq_lengths=(length, length))


def options(bs):
    return {"BLOCK_M": 64, "BLOCK_N": 64} if bs == 64 else None


def run_variant(name, q, k, v, block_map, bs):
    s = q.shape[2]
    if name == "full":
        return FLEX(q, k, v, block_mask=mask_full(block_map, s, bs), kernel_options=options(bs))
    if name == "partial":
        return FLEX(q, k, v, block_mask=mask_partial_tail(block_map, s, bs),
                    kernel_options=options(bs))
    padded = -(-s // bs) * bs
    pad = (0, 0, 0, padded - s)
    qp, kp, vp = (F.pad(t, pad) for t in (q, k, v))
    out = FLEX(qp, kp, vp, block_mask=mask_partial_tail(block_map, s, bs, padded),
               kernel_options=options(bs))
    return out[:, :, :s]


def main():
    torch.manual_seed(0)
    print(f"torch {torch.__version__} on {torch.cuda.get_device_name()}")
    shapes = [(1, 2, 100, 64, 64), (1, 2, 40, 64, 64), (1, 2, 4100, 128, 128),
              (2, 3, 1000, 64, 128), (1, 2, 1000, 64, 64), (1, 12, 3963, 128, 128)]
    print(f"{'B,H,S,D,bs':<22} {'dtype':<9} {'full':>10} {'partial':>10} {'padded':>10}")
    for b, h, s, d, bs in shapes:
        for dtype in (torch.float32, torch.bfloat16):
            q, k, v = (torch.randn(b, h, s, d, device="cuda", dtype=dtype) for _ in range(3))
            nb = -(-s // bs)
            block_map = torch.rand(b, h, nb, nb, device="cuda") < 0.5
            block_map |= torch.eye(nb, dtype=torch.bool, device="cuda")
            ref = masked_attention_reference(q.double(), k.double(), v.double(), block_map,
                                             block_size=bs)
            errs = []
            for name in ("full", "partial", "padded"):
                try:
                    out = run_variant(name, q, k, v, block_map, bs)
                    errs.append(f"{(out.double() - ref).abs().max().item():10.2e}")
                except Exception as error:  # report, keep going
                    errs.append(f"{type(error).__name__[:10]:>10}")
            print(f"{str((b, h, s, d, bs)):<22} {str(dtype)[6:]:<9} {' '.join(errs)}", flush=True)


if __name__ == "__main__":
    main()
