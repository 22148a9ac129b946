"""Attention backend registry: Backend enum, registration, availability, input constraint checks."""

from __future__ import annotations

import importlib.util
import logging
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

import torch

logger = logging.getLogger(__name__)

SUPPORTED_BLOCK_SIZES = (64, 128)


class Backend(str, Enum):
    """Block-sparse attention backends; `auto` picks the best one available on the device."""

    AUTO = "auto"
    FA4 = "fa4"
    FLEX = "flex"
    TORCH = "torch"
    DENSE = "dense"


# fn(q, k, v, block_map, *, block_size, scale, key_valid) -> out: every backend has this
# signature; key_valid (int [B] or None) is the count of valid keys, the rest key padding.
BackendFn = Callable[..., torch.Tensor]


@dataclass(frozen=True)
class BackendSpec:
    """A registered backend: its function, when it can run, and what it needs when it can't."""

    name: Backend
    fn: BackendFn
    is_available: Callable[[torch.device], bool]
    requirement: str
    why_unavailable: Callable[[torch.device], str] | None = None  # a reason naming the device

    def reason(self, device: torch.device) -> str:
        """Why the backend can't run on `device` (its requirement unless it says more)."""
        return self.why_unavailable(device) if self.why_unavailable else self.requirement


_REGISTRY: dict[Backend, BackendSpec] = {}
_LOGGED: set[str] = set()


def register_backend(
    name: Backend | str,
    *,
    is_available: Callable[[torch.device], bool] = lambda device: True,
    requirement: str = "",
    why_unavailable: Callable[[torch.device], str] | None = None,
) -> Callable[[BackendFn], BackendFn]:
    """Decorator registering `fn` as backend `name` (availability is checked per device)."""

    def decorate(fn: BackendFn) -> BackendFn:
        backend = Backend(name)
        _REGISTRY[backend] = BackendSpec(backend, fn, is_available, requirement, why_unavailable)
        return fn

    return decorate


# Looked up once at import, so availability checks stay traceable under torch.compile.
TRITON_IMPORTABLE = importlib.util.find_spec("triton") is not None
_FLEX_IMPORTABLE = (importlib.util.find_spec("torch.nn.attention.flex_attention") is not None
                    and TRITON_IMPORTABLE)
# The Triton selection kernels (triton_select) on CUDA; DITPLAN_TRITON_SELECTION=0 keeps the
# PyTorch twins everywhere (to compare, or if a Triton build misbehaves on a card).
USE_TRITON_SELECTION = os.environ.get("DITPLAN_TRITON_SELECTION", "1") != "0"


def flex_is_available(device: torch.device) -> bool:
    """FlexAttention needs a CUDA device, torch.nn.attention.flex_attention and Triton."""
    return device.type == "cuda" and _FLEX_IMPORTABLE and torch.cuda.is_available()


def triton_selection_applies(x: torch.Tensor) -> bool:
    """True when selection on `x` runs the Triton kernels: CUDA, Triton importable, eager (a
    compiled graph traces the PyTorch twins, which inductor fuses itself), not switched off."""
    return (USE_TRITON_SELECTION and x.is_cuda and TRITON_IMPORTABLE
            and not torch.compiler.is_compiling())


def parse_backend(name: Backend | str) -> Backend:
    """Backend from its name; a ValueError listing the valid names otherwise."""
    try:
        return Backend(name)
    except ValueError:
        valid = ", ".join(repr(b.value) for b in Backend)
        raise ValueError(f"unknown attention backend {name!r}; use one of {valid}") from None


def backend_spec(name: Backend | str) -> BackendSpec:
    """The registered backend `name` (whether or not it can run here)."""
    return _REGISTRY[parse_backend(name)]


def _log_once(level: int, message: str) -> None:
    # Logging is a graph break under torch.compile; decisions are logged by eager calls only.
    if torch.compiler.is_compiling() or message in _LOGGED:
        return
    _LOGGED.add(message)
    logger.log(level, message)


# What `auto` tries, fastest first; `torch` runs where none of them can. A backend asked for by
# name falls back to the next one in this order that can run, else to `torch`.
AUTO_ORDER = (Backend.FA4, Backend.FLEX)


def _first_available(order: tuple[Backend, ...], device: torch.device) -> Backend:
    return next((b for b in order if _REGISTRY[b].is_available(device)), Backend.TORCH)


# Backends whose kernels cannot mask padding keys (key_valid): FlashAttention-4's block-sparse
# forward masks only the sequence tail.
NO_KEY_PADDING = (Backend.FA4,)


def _skip_reason(backend: Backend, device: torch.device, key_padding: bool) -> str:
    spec = _REGISTRY[backend]
    if key_padding and backend in NO_KEY_PADDING and spec.is_available(device):
        return "takes no key padding"
    return spec.reason(device)


def resolve_backend(name: Backend | str, device: torch.device, *,
                    key_padding: bool = False) -> BackendSpec:
    """The backend to run on `device`: `auto` -> fa4 on Hopper with flash-attn-4 installed, else
    flex on CUDA if available, else torch (one log line, naming why a faster one was skipped).

    A backend asked for by name but unavailable on the device falls back to the next available
    one of AUTO_ORDER (fa4 -> flex), else `torch`, with one warning log line (per backend and
    device type), never an exception. With `key_padding` (the call passes key_valid) `auto`
    skips fa4, and fa4 asked for by name is refused (ValueError).
    """
    backend = parse_backend(name)
    if key_padding and backend in NO_KEY_PADDING:
        raise ValueError(f"the {backend.value} backend takes no key padding (key_valid: padded "
                         "text keys to ignore); use backend 'auto' or 'flex'")
    if backend is Backend.AUTO:
        order = tuple(b for b in AUTO_ORDER if not (key_padding and b in NO_KEY_PADDING))
        chosen = _first_available(order, device)
        skipped = AUTO_ORDER[:AUTO_ORDER.index(chosen)] if chosen in AUTO_ORDER else ()
        why = "".join(f" ({b.value}: {_skip_reason(b, device, key_padding)})" for b in skipped)
        _log_once(logging.INFO, f"block_sparse_attention: backend auto -> {chosen.value} "
                                f"on {device.type}{why}")
        return _REGISTRY[chosen]
    spec = _REGISTRY[backend]
    if spec.is_available(device):
        return spec
    later = AUTO_ORDER[AUTO_ORDER.index(backend) + 1:] if backend in AUTO_ORDER else ()
    fallback = _first_available(later, device)
    _log_once(logging.WARNING, f"block_sparse_attention: backend {backend.value!r} is not "
                               f"available on {device.type} ({spec.reason(device)}); "
                               f"falling back to {fallback.value!r}")
    return _REGISTRY[fallback]


def check_block_size(block_size: int) -> None:
    """ValueError unless block_size is one of SUPPORTED_BLOCK_SIZES."""
    if isinstance(block_size, bool) or block_size not in SUPPORTED_BLOCK_SIZES:
        raise ValueError(f"block_size={block_size!r} is not supported; use 64 or 128")


def num_blocks(seq_len: int, block_size: int) -> int:
    """ceil(seq_len / block_size): blocks covering a sequence, the last possibly partial."""
    return math.ceil(seq_len / block_size)


def check_attention_inputs(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_map: torch.Tensor, block_size: int,
    key_valid: torch.Tensor | None = None,
) -> None:
    """ValueError naming the fix when q/k/v/block_map/key_valid don't meet the kernel contract.

    Args:
        q, k, v: [B, H, S, D] floating tensors of one dtype on one device.
        block_map: bool [B|1, H|1, ceil(S/block_size), ceil(S/block_size)], True = compute.
        block_size: 64 or 128.
        key_valid: int [B] valid keys per batch element (keys at positions >= key_valid[b]
            are padding, never attended), or None.
    """
    check_qkv(q, k, v, block_size)
    check_block_map(block_map, q.shape[0], q.shape[1], q.shape[2], block_size, device=q.device)
    check_key_valid(key_valid, q.shape[0], device=q.device)


def check_key_valid(key_valid: torch.Tensor | None, batch: int, *, device: torch.device) -> None:
    """ValueError unless key_valid is None or an integer [B] tensor on `device`. Its values
    (in [1, S]) are not checked: that would cost a host sync per call."""
    if key_valid is None:
        return
    if key_valid.dtype == torch.bool or key_valid.is_floating_point() or key_valid.is_complex():
        raise ValueError(f"key_valid must be an integer tensor (valid keys per batch element); "
                         f"got {key_valid.dtype}")
    if tuple(key_valid.shape) != (batch,):
        raise ValueError(f"key_valid must be [{batch}] (one count per batch element); got "
                         f"{tuple(key_valid.shape)}")
    if key_valid.device != device:
        raise ValueError(f"key_valid is on {key_valid.device} but q is on {device}")



def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_size: int) -> None:
    """ValueError unless q, k, v are [B, H, S, D] of one shape and floating dtype, S > 0, and
    block_size is supported."""
    check_block_size(block_size)
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.ndim != 4:
            raise ValueError(f"{name} must be [B, H, S, D] (4-D); got shape {tuple(x.shape)}")
    if q.shape != k.shape or q.shape != v.shape:
        raise ValueError(f"q, k, v must have the same [B, H, S, D] shape; got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if not q.is_floating_point() or q.dtype != k.dtype or q.dtype != v.dtype:
        raise ValueError(f"q, k, v must share one floating dtype; got {q.dtype}, {k.dtype}, "
                         f"{v.dtype}")
    if q.shape[2] == 0:
        raise ValueError("sequence length S must be positive")


def check_block_map(
    block_map: torch.Tensor, batch: int, heads: int, seq_len: int, block_size: int,
    *, device: torch.device,
) -> None:
    """ValueError unless block_map is bool [B|1, H|1, nb, nb] on `device`, nb = ceil(S/bs)."""
    nb = num_blocks(seq_len, block_size)
    if block_map.dtype != torch.bool:
        raise ValueError(f"block_map must be a bool tensor (True = compute); got {block_map.dtype}")
    shape = tuple(block_map.shape)
    if (block_map.ndim != 4 or shape[0] not in (1, batch) or shape[1] not in (1, heads)
            or shape[2:] != (nb, nb)):
        raise ValueError(f"block_map must be [{batch} or 1, {heads} or 1, {nb}, {nb}] "
                         f"(ceil(S={seq_len} / block_size={block_size}) = {nb}); got {shape}")
    if block_map.device != device:
        raise ValueError(f"block_map is on {block_map.device} but q is on {device}; "
                         "build the map on the same device as q")
