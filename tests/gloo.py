"""A few CPU processes in one gloo group, kept for a test session: run a function on each rank.

Each rank applies diffusers 0.42.1's two CPU workarounds (test-only, never in the library):
``enable_parallelism`` divides by the accelerator count (0 on a CPU-only host), and its
context-parallel hook logs through ``Logger.warning_once``, which only ``transformers`` adds.
"""

from __future__ import annotations

import pickle
import tempfile
import traceback
from datetime import timedelta
from pathlib import Path

import torch.multiprocessing as mp

COLLECTIVE_TIMEOUT_S = 30  # a rank left alone in a collective fails after this
REPLY_TIMEOUT_S = 120


class RankError(AssertionError):
    """A function raised on some ranks; the message holds each failing rank's traceback."""


class GlooRanks:
    """``world`` spawned processes that joined one gloo process group.

    ``run(fn, *args)`` calls ``fn(*args)`` on every rank at once (``fn`` importable by name)
    and returns the results in rank order; exceptions come back as :class:`RankError`.
    """

    def __init__(self, world: int = 2):
        self.world = world
        self._dir = tempfile.TemporaryDirectory(prefix="ditplan-gloo-")
        store = Path(self._dir.name) / "store"
        context = mp.get_context("spawn")
        self._pipes, self._processes = [], []
        for rank in range(world):
            parent, child = context.Pipe()
            process = context.Process(target=_serve, args=(rank, world, str(store), child),
                                      daemon=True)
            process.start()
            self._pipes.append(parent)
            self._processes.append(process)

    def run(self, fn, *args) -> list:
        for pipe in self._pipes:
            pipe.send_bytes(pickle.dumps((fn, args)))
        replies = []
        for rank, pipe in enumerate(self._pipes):
            if not pipe.poll(REPLY_TIMEOUT_S):
                self.close()
                raise TimeoutError(f"rank {rank} did not answer {fn.__name__} in "
                                   f"{REPLY_TIMEOUT_S} s; the ranks were stopped")
            replies.append(pickle.loads(pipe.recv_bytes()))
        failed = [f"rank {rank}:\n{value}" for rank, (ok, value) in enumerate(replies) if not ok]
        if failed:
            raise RankError("\n".join(failed))
        return [value for _, value in replies]

    def close(self) -> None:
        """Leave the process group on every rank and end the processes."""
        for pipe in self._pipes:
            try:
                pipe.send_bytes(pickle.dumps(None))
            except (BrokenPipeError, OSError):
                pass
        for process in self._processes:
            process.join(timeout=30)
            if process.is_alive():
                process.kill()
                process.join()
        self._dir.cleanup()


def apply_cpu_shims() -> None:
    """diffusers 0.42.1's two CPU workarounds, in this process (test processes only)."""
    import functools
    import logging

    import torch

    torch.accelerator.device_count = lambda: 1  # 0 on a CPU-only host: enable_parallelism / 0
    if not hasattr(logging.Logger, "warning_once"):  # what importing transformers adds
        logging.Logger.warning_once = functools.lru_cache(None)(logging.Logger.warning)


def _serve(rank: int, world: int, store: str, pipe) -> None:
    import torch
    import torch.distributed as dist

    apply_cpu_shims()
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S))
    try:
        while (job := pickle.loads(pipe.recv_bytes())) is not None:
            fn, args = job
            try:
                reply = (True, fn(*args))
            except BaseException:
                reply = (False, traceback.format_exc())
            pipe.send_bytes(pickle.dumps(reply))
    finally:
        dist.destroy_process_group()
