"""Wan's q/k RMSNorm and rotary embedding on sparse steps: one torch.compile'd kernel on CUDA.

Eager, WanAttnProcessor's arithmetic takes about a dozen elementwise kernels per layer for q and
k (the norm, then the interleaved rotary in float32 through strided views and a cast back); the
compiled twin reads q and k once and writes them once. The arithmetic is the same (the eager twin
is what gets compiled), so outputs differ from eager only by float rounding order. CPU, and any
call inside a user's own ``torch.compile``, runs the eager twin; a failed compilation logs once and
falls back to it. ``DITPLAN_FUSED_QK=0`` turns the compiled path off.
"""

from __future__ import annotations

import logging
import os

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)
ENV_SWITCH = "DITPLAN_FUSED_QK"


def apply_wan_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Wan's interleaved rotary embedding, the same arithmetic as diffusers' WanAttnProcessor.

    Args:
        x: [B, S, H, D]; cos, sin: diffusers' tables [1, S, 1, D] (each value twice), or the
            channels its processor reads, [1, S, 1, D / 2]: cos[..., 0::2], sin[..., 1::2]
            (what the token permutation keeps, runtime/adapters/wan.py).
    """
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    if cos.shape[-1] == x.shape[-1]:
        cos, sin = cos[..., 0::2], sin[..., 1::2]
    if torch.compiler.is_compiling():
        # The same values as below in one elementwise expression over (even, odd) pairs, which
        # inductor writes in one pass. diffusers' slice assignments (below) compiled into
        # separate half-tensors of q and k, 8 x 48 MiB live at the compiled dense Wan2.1-1.3B
        # forward's peak (BENCHMARKS.md, issue 14, session 12); a torch.stack of the halves
        # compiled into a float32 pair buffer. even: x1 c + x2 (-s), odd: x2 c + x1 s.
        pairs = x.unflatten(-1, (-1, 2))  # [B, S, H, D / 2, 2]
        sign = torch.tensor([-1.0, 1.0], dtype=cos.dtype, device=cos.device)
        rotated = pairs * cos[..., None] + pairs.flip(-1) * (sin[..., None] * sign)
        return rotated.flatten(-2).to(x.dtype)
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(x)


def norm_rotate_qk_eager(q: torch.Tensor, k: torch.Tensor, weight_q: torch.Tensor,
                         weight_k: torch.Tensor, eps: float | None, cos: torch.Tensor,
                         sin: torch.Tensor, heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm over the channels, split into heads, rotate: q, k [B, S, C] -> [B, S, H, D]."""
    q = F.rms_norm(q, (q.shape[-1],), weight_q, eps).unflatten(2, (heads, -1))
    k = F.rms_norm(k, (k.shape[-1],), weight_k, eps).unflatten(2, (heads, -1))
    return apply_wan_rotary(q, cos, sin), apply_wan_rotary(k, cos, sin)


def compiled(backend: str = "inductor"):
    """:func:`norm_rotate_qk_eager` under ``torch.compile`` (one graph, no breaks)."""
    return torch.compile(norm_rotate_qk_eager, fullgraph=True, backend=backend)


class _Fused:
    """The compiled twin, built on first use; disabled for the process once it fails."""

    def __init__(self):
        self.fn = None
        self.failed = False

    def __call__(self, *args):
        if self.fn is None:
            self.fn = compiled()
        try:
            return self.fn(*args)
        except Exception as error:  # a compiler or toolchain failure: eager is always right
            self.failed = True
            logger.warning("fused q/k norm + rotary disabled (%s: %s); running eager",
                           type(error).__name__, error)
            return norm_rotate_qk_eager(*args)


_FUSED = _Fused()


def norm_rotate_qk(attn: nn.Module, q: torch.Tensor, k: torch.Tensor,
                   rotary_emb: tuple[torch.Tensor, torch.Tensor]
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """``attn.norm_q`` / ``attn.norm_k`` then Wan's rotary: q, k [B, S, C] -> [B, S, H, D];
    compiled on CUDA when the norms are plain ``nn.RMSNorm`` (see the module docstring)."""
    fusable = (q.is_cuda and not _FUSED.failed and os.environ.get(ENV_SWITCH, "1") != "0"
               and not torch.compiler.is_compiling()
               and type(attn.norm_q) is nn.RMSNorm and type(attn.norm_k) is nn.RMSNorm
               and attn.norm_q.weight is not None and attn.norm_k.weight is not None
               and attn.norm_q.eps == attn.norm_k.eps)
    if not fusable:
        q, k = attn.norm_q(q), attn.norm_k(k)
        q, k = (t.unflatten(2, (attn.heads, -1)) for t in (q, k))
        return apply_wan_rotary(q, *rotary_emb), apply_wan_rotary(k, *rotary_emb)
    return _FUSED(q, k, attn.norm_q.weight, attn.norm_k.weight, attn.norm_q.eps,
                  *rotary_emb, attn.heads)
