"""`fa4` backend: FlashAttention-4's CuTe-DSL block-sparse forward (Hopper) on sorted block lists.

FlashAttention-4 (`pip install "ditplan[fa4]"`: flash-attn-4 and nvidia-cutlass-dsl[cu13]) takes
per (batch, head, query block) the count and the indices of the kept 128-token key blocks and
runs only those tiles. It is imported on first use, never at ditplan's import; where it is not
installed, does not import, or the GPU is not sm90, `auto` picks flex and says why in one log
line. Calls it cannot take (block size 64, float32, head dim over 128, autograd) run on flex.

Trap: the kernel walks each list from its last entry down and masks the sequence tail (keys
past S in a partial last block) only in the first block it visits, so lists must be ascending
(block_lists builds them so); an unsorted list with the partial block kept mid-list lets
padded keys into the softmax without any error (tests/kernels/test_fa4_gpu.py checks both).

Without autograd the kernel runs as the custom op `ditplan::fa4_block_sparse_attention`, opaque
to an outer torch.compile: new lists each step reuse the graph. The CuTe kernel compiles in
process on first use of a configuration (no nvcc); sequence lengths are not in its compile key.
Only sm90 is enabled: on sm100 FA4 stages two 128-row query tiles, so its sparse query blocks
are 256 rows, which ditplan's 128-token lists do not give (and no sm100 card was at hand).
Measured on an H200: BENCHMARKS.md, "FlashAttention-4 backend (issue 14)".
"""

from __future__ import annotations

import importlib.util
import logging

import torch

from .block_lists import lists_from_map
from .registry import Backend, _log_once, register_backend, triton_selection_applies

BLOCK_SIZE = 128  # the sm90 kernel's key tile: sparse blocks must match it
_HOPPER = 9
_FA4: dict[str, object] = {}  # "reason" ("" once imported), "func", "tensors"


def _load() -> str:
    """Import flash_attn.cute once; '' when it works, else why not (the install hint)."""
    if "reason" not in _FA4:
        if importlib.util.find_spec("flash_attn") is None:
            _FA4["reason"] = "flash-attn-4 is not installed: pip install 'ditplan[fa4]'"
            return _FA4["reason"]
        try:
            from flash_attn.cute import flash_attn_func
            from flash_attn.cute.block_sparsity import BlockSparseTensorsTorch
        except Exception as exc:  # a broken install must fall back, never crash the caller
            _FA4["reason"] = f"flash_attn.cute did not import ({type(exc).__name__}: {exc})"
            return _FA4["reason"]
        _FA4.update(reason="", func=flash_attn_func, tensors=BlockSparseTensorsTorch)
    return _FA4["reason"]


@torch.compiler.assume_constant_result
def _reason_on_cuda(index: int) -> str:
    # A constant to torch.compile: evaluated once while tracing, never inside the graph.
    major, minor = torch.cuda.get_device_capability(index)
    if major != _HOPPER:
        return f"needs a Hopper (sm90) GPU, this one is sm{major}{minor}"
    return _load()


def fa4_unavailable_reason(device: torch.device) -> str:
    """'' when fa4 can run on `device`, else why not."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return "needs a CUDA device"
    return _reason_on_cuda(torch.device(device).index or 0)


def fa4_is_available(device: torch.device) -> bool:
    """flash_attn.cute imports and `device` is an sm90 GPU."""
    return not fa4_unavailable_reason(device)


def fa4_takes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_size: int) -> bool:
    """True when the kernel can run this call: 128-token blocks, fp16/bf16, head dim a multiple
    of 8 up to 128, no autograd."""
    needs_grad = torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v))
    return (block_size == BLOCK_SIZE and q.dtype in (torch.float16, torch.bfloat16)
            and q.shape[-1] % 8 == 0 and q.shape[-1] <= 128 and not needs_grad)


@register_backend(
    Backend.FA4, is_available=fa4_is_available, why_unavailable=fa4_unavailable_reason,
    requirement="needs flash-attn-4 (pip install 'ditplan[fa4]') and a Hopper (sm90) GPU",
)
def fa4_block_sparse_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_map: torch.Tensor,
    *, block_size: int, scale: float | None = None, key_valid: torch.Tensor | None = None,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """FlashAttention-4 over the kept blocks of `block_map` (sm90); flex for calls it can't take.

    Args:
        q, k, v: [B, H, S, D] on CUDA.
        block_map: bool [B|1, H|1, ceil(S/bs), ceil(S/bs)], True = compute.
        block_size: 128 for the kernel (64 runs on flex).
        scale: softmax scale; 1/sqrt(D) when None.
        key_valid: must be None: the kernel masks no padding keys (ValueError otherwise;
            `auto` resolves such calls to flex).
        return_lse: also return the log-sum-exp of each query's kept scores.

    Returns:
        [B, H, S, D] in q's dtype; with `return_lse`, (out, lse [B, H, S] float32).
    """
    if key_valid is not None:
        raise ValueError("the fa4 backend takes no key padding (key_valid); use backend "
                         "'auto' or 'flex'")
    if not fa4_takes(q, k, v, block_size):
        return _on_flex(q, k, v, block_map, block_size, scale, return_lse)
    block_map = block_map.expand(*q.shape[:2], *block_map.shape[2:])  # [B, H, Qb, Kb]
    if triton_selection_applies(block_map):  # one Triton kernel, twin of lists_from_map
        from . import triton_select

        counts, indices = triton_select.kv_lists(block_map, False)[2:]
    else:
        counts, indices = lists_from_map(block_map)
    return fa4_attention_from_lists(q, k, v, counts, indices, scale, return_lse=return_lse)


def _on_flex(q, k, v, block_map, block_size, scale, return_lse=False):
    from .flex import flex_block_sparse_attention

    _log_once(logging.INFO, f"block_sparse_attention: fa4 takes 128-token blocks, fp16/bf16, "
                            f"head dim <= 128 and no autograd; this call (block {block_size}, "
                            f"{q.dtype}, D={q.shape[-1]}) runs on flex")
    return flex_block_sparse_attention(q, k, v, block_map, block_size=block_size, scale=scale,
                                       return_lse=return_lse)


def fa4_attention_from_lists(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, counts: torch.Tensor,
    indices: torch.Tensor, scale: float | None = None, *, return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Block-sparse attention on kept-block lists (the fa4 kernel, no bool map).

    Args:
        q, k, v: [B, H, S, D] fp16/bf16 on an sm90 GPU (a [B, S, H, D] tensor's transpose
            is taken without a copy), D a multiple of 8 up to 128.
        counts: int32 [B, H, ceil(S/128)] kept key blocks per query block.
        indices: int32 [B, H, ceil(S/128), W] their indices, ASCENDING in each row's first
            `count` entries (the rest is never read).
        scale: softmax scale; 1/sqrt(D) when None.
        return_lse: also return the log-sum-exp of each query's kept scores.

    Returns:
        [B, H, S, D] in q's dtype (a transposed view of a [B, S, H, D] buffer); with
        `return_lse`, (out, lse [B, H, S] float32).
    """
    out, lse = fa4_block_sparse_attention_op(q, k, v, counts, indices, scale, return_lse)
    return (out, lse) if return_lse else out


_NO_PARTIAL: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def _no_partial_blocks(batch: int, heads: int, num_q: int, device: torch.device):
    # The kernel requires the per-element-masked ("mask") lists even when empty: zero counts.
    key = (batch, heads, num_q, device)
    if key not in _NO_PARTIAL:
        _NO_PARTIAL[key] = (torch.zeros(batch, heads, num_q, dtype=torch.int32, device=device),
                            torch.zeros(batch, heads, num_q, 1, dtype=torch.int32, device=device))
    return _NO_PARTIAL[key]


@torch.library.custom_op("ditplan::fa4_block_sparse_attention", mutates_args=())
def fa4_block_sparse_attention_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, counts: torch.Tensor,
    indices: torch.Tensor, scale: float | None, return_lse: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel call as one opaque op: [B, H, S, D] in; out [B, H, S, D] and, with
    `return_lse`, its log-sum-exp [B, H, S] float32 out (else an empty tensor: the kernel then
    writes none)."""
    _load()
    batch, heads, num_q = counts.shape
    empty_counts, empty_indices = _no_partial_blocks(batch, heads, num_q, q.device)
    sparse = _FA4["tensors"](
        mask_block_cnt=empty_counts, mask_block_idx=empty_indices, full_block_cnt=counts,
        full_block_idx=indices, block_size=(BLOCK_SIZE, BLOCK_SIZE))
    out, lse = _FA4["func"](q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                            softmax_scale=scale, block_sparse_tensors=sparse,
                            return_lse=return_lse)  # [B, S, H, D]; lse [B, H, S] or None
    return out.transpose(1, 2), lse.float() if return_lse else q.new_empty(0, dtype=torch.float32)


@fa4_block_sparse_attention_op.register_fake
def _(q, k, v, counts, indices, scale, return_lse=False):
    batch, heads, seq_len, head_dim = q.shape
    out = q.new_empty(batch, seq_len, heads, head_dim).transpose(1, 2)
    lse_shape = (batch, heads, seq_len) if return_lse else (0,)
    return out, q.new_empty(lse_shape, dtype=torch.float32)
