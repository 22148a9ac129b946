"""`flex` backend: block map -> BlockMask.from_kv_blocks -> flex_attention compiled once per shape.

The map enters only as BlockMask tensors (counts, indices), so a new map each step reuses the
compiled kernel: no recompilation, no Python mask_mod in the hot path (attention-gym's
`create_causal_block_mask_fast` builds its masks the same way).

Partial tail block (S not a multiple of block_size): kept blocks of the last key column go in
as PARTIAL blocks with the mask_mod `kv_idx < S`, all other kept blocks as FULL blocks (no
mask_mod evaluated). This relies on flex's documented partial-block semantics rather than on
inductor's internal boundary checks (both were exact on an H100, torch 2.11, 2026-11-26:
benchmarks/flex_tail_check.py). BlockMask's seq_lengths must equal (S, S).

Key padding (key_valid, int [B]): per batch element b the kept blocks wholly before
key_valid[b] are FULL, the one holding position key_valid[b] (if not block-aligned) PARTIAL with
the mask_mod `kv_idx < key_valid[b]`, and the blocks after it are dropped. The mask_mod closes
over the key_valid tensor: dynamo matches closures by their code, so a new tensor each call
reuses the compiled kernel (it becomes a kernel input).

Without autograd the call is the custom op `ditplan::flex_block_sparse_attention`, opaque to an
outer torch.compile of the model: the model's graph does not inline flex (which made compiling
a 30-layer model with sparse layers take minutes), and flex itself compiles once per shape.

Each new (shape, dtype, block size) is one dynamo recompile. Past dynamo's recompile limit
(8 by default) torch runs flex_attention eagerly, and on an H100 (torch 2.11, 2026-11-26) that
eager path returned wrong results for our BlockMasks (errors 0.2-0.8 against the reference, see
benchmarks/flex_tail_check.py), besides materializing S x S scores. So the compiled call runs
with a higher limit and with fail_on_recompile_limit_hit, which raises instead of falling back.
"""

from __future__ import annotations

import functools

import torch

from .block_lists import lists_from_map
from .registry import Backend, flex_is_available, register_backend, triton_selection_applies

try:
    from torch.nn.attention.flex_attention import BlockMask, flex_attention
except ImportError:  # torch without FlexAttention: the backend reports itself unavailable
    BlockMask = flex_attention = None

_COMPILED_FLEX = None


def _compiled_flex():
    # One torch.compile(flex_attention, dynamic=False) per process; inductor caches a kernel per
    # shape. Under an outer torch.compile the plain function is traced into the caller's graph.
    global _COMPILED_FLEX
    if _COMPILED_FLEX is None:
        _COMPILED_FLEX = torch.compile(flex_attention, dynamic=False)
    return _COMPILED_FLEX


@functools.cache
def _keys_before(seq_len: int):
    # One function object per S, so the compiled flex kernel is reused (dynamo guards on it).
    def mask_mod(b, h, q_idx, kv_idx):
        return kv_idx < seq_len

    mask_mod.__name__ = f"keys_before_{seq_len}"
    return mask_mod


_RECOMPILE_LIMIT = 64


def _call_compiled(*args, **kwargs):
    if torch.compiler.is_compiling():  # traced into an outer graph (autograd path)
        return flex_attention(*args, **kwargs)
    settings = {"recompile_limit": _RECOMPILE_LIMIT, "fail_on_recompile_limit_hit": True}
    known = {k: v for k, v in settings.items() if hasattr(torch._dynamo.config, k)}
    with torch._dynamo.config.patch(**known):
        return _compiled_flex()(*args, **kwargs)


def _keys_valid(key_valid: torch.Tensor):
    # A new function per call (same code): the compiled kernel takes key_valid as an input.
    def mask_mod(b, h, q_idx, kv_idx):
        return kv_idx < key_valid[b]

    return mask_mod


def block_mask_from_map(
    block_map: torch.Tensor, seq_len: int, block_size: int, *,
    key_valid: torch.Tensor | None = None, compute_q_blocks: bool = False,
) -> BlockMask:
    """BlockMask whose kept blocks are exactly the True entries of `block_map`.

    Args:
        block_map: bool [B|1, H|1, Qb, Kb], True = compute.
        seq_len: S (Qb = Kb = ceil(S / block_size)).
        block_size: tokens per block.
        key_valid: int [B] valid keys per batch element (the rest padding), or None.
        compute_q_blocks: also build the transposed (q-major) indices; only backward needs them.

    Returns:
        BlockMask with seq_lengths (S, S); kv indices full width [B|1, H|1, Qb, Kb] int32 (a
        narrower tensor ends in a device-side assert), [B, ...] with key_valid. Kept blocks are
        FULL blocks, except those of a partial last key block, which are PARTIAL blocks masked
        by `kv_idx < S`; with key_valid, see the module docstring.
    """
    if key_valid is not None:
        limits = key_valid.clamp(max=seq_len).to(torch.int32)  # [B]
        return BlockMask.from_kv_blocks(
            *_padded_kv_lists(block_map, limits, block_size), BLOCK_SIZE=block_size,
            mask_mod=_keys_valid(limits), seq_lengths=(seq_len, seq_len),
            compute_q_blocks=compute_q_blocks,
        )
    tail = seq_len % block_size != 0
    if triton_selection_applies(block_map):  # one Triton kernel, twin of _kv_lists
        from . import triton_select

        lists = triton_select.kv_lists(block_map, tail)
    else:
        lists = _kv_lists(block_map, tail)
    return BlockMask.from_kv_blocks(
        *lists, BLOCK_SIZE=block_size, mask_mod=_keys_before(seq_len) if tail else None,
        seq_lengths=(seq_len, seq_len), compute_q_blocks=compute_q_blocks,
    )


def _kv_lists(block_map: torch.Tensor, tail: bool):
    """(partial counts, partial indices, full counts, full indices), int32, of a bool map
    [B|1, H|1, Qb, Kb]; with `tail` the last key block is each row's partial block when kept."""
    full_map = block_map
    if tail:  # the partial last key block is listed apart
        full_map = block_map.clone()
        full_map[..., -1] = False
    full_counts, full_indices = lists_from_map(full_map)
    # Only the last key block can be partial, so its row lists are that one index (no sort).
    # The partial index tensor must be its own buffer: aliasing it with full_kv_indices breaks
    # inductor's CPU codegen.
    last = block_map[..., -1] if tail else torch.zeros_like(block_map[..., -1])
    partial_counts = last.to(torch.int32)  # [B|1, H|1, Qb], 1 where the tail block is kept
    partial_indices = torch.full_like(full_indices, block_map.shape[-1] - 1)
    return partial_counts, partial_indices, full_counts, full_indices


def _padded_kv_lists(block_map: torch.Tensor, limits: torch.Tensor, block_size: int):
    """_kv_lists under key padding: per batch element b, the kept blocks before limits[b] // bs
    are full, block limits[b] // bs is partial when limits[b] is not block-aligned, later blocks
    are dropped. block_map [B|1, H|1, Qb, Kb], limits int32 [B] -> lists [B, H|1, Qb, ...]."""
    num_key_blocks = block_map.shape[-1]
    whole = torch.div(limits, block_size, rounding_mode="floor")  # [B] wholly valid blocks
    columns = torch.arange(num_key_blocks, device=block_map.device)
    before = (columns < whole[:, None])[:, None, None, :]  # [B, 1, 1, Kb]
    full_counts, full_indices = lists_from_map(block_map & before)  # [B, H|1, Qb(, Kb)]
    edge = whole.clamp(max=num_key_blocks - 1).long()  # [B] the block holding limits[b]
    index = edge[:, None, None, None].expand(*full_indices.shape[:-1], 1)  # [B, H|1, Qb, 1]
    kept = block_map.expand_as(full_indices).gather(-1, index)[..., 0]  # [B, H|1, Qb]
    partial_counts = (kept & (limits % block_size != 0)[:, None, None]).to(torch.int32)
    partial_indices = index.to(torch.int32).expand_as(full_indices).contiguous()  # own buffer
    return partial_counts, partial_indices, full_counts, full_indices


def _kernel_options(block_size: int, head_dim: int, device: torch.device) -> dict | None:
    # Inductor's default tile for bf16 D<=128 on H100 is BLOCK_M=128, which must divide the
    # sparse block size; 64-token blocks need 64x64 tiles. Larger head dims default to <= 64.
    # On Hopper and newer, TMA loads made the d=0.2 kernel 7% faster (3.50 -> 3.26 ms, H200,
    # torch 2.11, 2026-11-26, BENCHMARKS.md); flex turns TMA off itself where strides forbid it.
    options = {}
    if block_size == 64 and head_dim <= 128:
        options.update(BLOCK_M=64, BLOCK_N=64)
    if device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9:
        options["USE_TMA"] = True
    return options or None


@register_backend(
    Backend.FLEX, is_available=flex_is_available,
    requirement="needs a CUDA device, torch.nn.attention.flex_attention and triton",
)
def flex_block_sparse_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_map: torch.Tensor,
    *, block_size: int, scale: float | None = None, key_valid: torch.Tensor | None = None,
    kernel_options: dict | None = None, return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """FlexAttention over the kept blocks of `block_map` (CUDA).

    Args:
        q, k, v: [B, H, S, D] on CUDA, D >= 16.
        block_map: bool [B|1, H|1, ceil(S/bs), ceil(S/bs)], True = compute.
        block_size: 64 or 128.
        scale: softmax scale; 1/sqrt(D) when None.
        key_valid: int [B] valid keys per batch element (the rest padding), or None.
        kernel_options: flex tile settings instead of the defaults (for tuning sweeps).
        return_lse: also return the log-sum-exp (base e) of each query's kept scores.

    Returns:
        [B, H, S, D] in q's dtype; query rows with no kept key are 0. With `return_lse`,
        (out, lse [B, H, S] float32, -inf for rows with no kept key).
    """
    needs_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad
                                               or v.requires_grad)
    if needs_grad or kernel_options is not None:
        return _flex(q, k, v, block_map, block_size, scale, key_valid,
                     compute_q_blocks=needs_grad, kernel_options=kernel_options,
                     return_lse=return_lse)
    if return_lse:
        return flex_block_sparse_attention_lse_op(q, k, v, block_map, block_size, scale,
                                                  key_valid)
    return flex_block_sparse_attention_op(q, k, v, block_map, block_size, scale, key_valid)


def _flex(q, k, v, block_map, block_size, scale, key_valid=None, *, compute_q_blocks=False,
          kernel_options=None, return_lse=False):
    # out [B, H, S, D], or (out, lse [B, H, S] float32) with return_lse
    seq_len, head_dim = q.shape[-2], q.shape[-1]
    mask = block_mask_from_map(block_map, seq_len, block_size, key_valid=key_valid,
                               compute_q_blocks=compute_q_blocks)
    options = kernel_options or _kernel_options(block_size, head_dim, q.device)
    return _call_compiled(q, k, v, block_mask=mask, scale=scale, kernel_options=options,
                          return_lse=return_lse)


@torch.library.custom_op("ditplan::flex_block_sparse_attention", mutates_args=())
def flex_block_sparse_attention_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_map: torch.Tensor,
    block_size: int, scale: float | None, key_valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """The inference call as one opaque op ([B, H, S, D] in, [B, H, S, D] out)."""
    return _flex(q, k, v, block_map, block_size, scale, key_valid)


@flex_block_sparse_attention_op.register_fake
def _(q, k, v, block_map, block_size, scale, key_valid=None):
    return torch.empty_like(q)


@torch.library.custom_op("ditplan::flex_block_sparse_attention_lse", mutates_args=())
def flex_block_sparse_attention_lse_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_map: torch.Tensor,
    block_size: int, scale: float | None, key_valid: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The inference call with its log-sum-exp ([B, H, S, D] and [B, H, S] float32 out)."""
    return _flex(q, k, v, block_map, block_size, scale, key_valid, return_lse=True)


@flex_block_sparse_attention_lse_op.register_fake
def _(q, k, v, block_map, block_size, scale, key_valid=None):
    return torch.empty_like(q), q.new_empty(q.shape[:3], dtype=torch.float32)
