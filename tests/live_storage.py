"""Test helper: live tensor-storage bytes during a call, by a dispatch mode (CPU peak memory)."""

from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class LiveStorages(TorchDispatchMode):
    """Counts the bytes of every storage an op allocates under the mode until it is freed
    (views and ops writing into their inputs allocate nothing), and snapshots the live total
    whenever ``watch`` runs (e.g. ``torch.ops.aten.gelu.default``: where a transformer block's
    feed-forward holds most, a dense forward's peak)."""

    def __init__(self, watch):
        super().__init__()
        self.watch = watch
        self.live_bytes = 0
        self.at_watch: list[int] = []  # live bytes after each call of ``watch``
        self._live: set[int] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not func.is_view:
            inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs))
                      if isinstance(t, torch.Tensor)}
            for t in tree_leaves(out):
                if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                    self._count(t.untyped_storage())
        if func is self.watch:
            self.at_watch.append(self.live_bytes)
        return out

    def _count(self, storage) -> None:
        key = storage.data_ptr()
        if key in self._live or storage.nbytes() == 0:
            return
        self._live.add(key)
        self.live_bytes += storage.nbytes()
        weakref.finalize(storage, self._free, key, storage.nbytes())

    def _free(self, key: int, nbytes: int) -> None:
        self._live.discard(key)
        self.live_bytes -= nbytes
