"""Multi-process launches of ``ditplan run``: torchrun's ranks, ``--nproc``, the process group."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping
from contextlib import contextmanager
from dataclasses import dataclass

# What torchrun sets in every rank's environment (env:// initialisation reads them).
TORCHRUN_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
# Process counts other launchers set (mpirun, PMI-based SLURM/Intel MPI).
SIZE_VARIABLES = ("WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE")
TORCHRUN_HINT = ("launch it as `ditplan run --nproc N ...` or `torchrun --nproc-per-node N "
                 "-m ditplan.runtime.cli run ...`")


class LaunchError(ValueError):
    """The processes were launched in a way ``ditplan run`` cannot join."""


@dataclass(frozen=True)
class Launch:
    """This process's place in a torchrun launch of ``world`` processes."""

    world: int
    rank: int
    local_rank: int

    @property
    def writes_outputs(self) -> bool:
        return self.rank == 0


def launched_as_ranks(environ: Mapping[str, str] = os.environ) -> int:
    """The process count of a multi-process launch (torchrun, mpirun, SLURM ...), else 1."""
    for name in SIZE_VARIABLES:
        try:
            size = int(environ.get(name, "1"))
        except ValueError:
            continue
        if size > 1:
            return size
    return 1


def detect_launch(environ: Mapping[str, str] = os.environ) -> Launch | None:
    """None in a single process; this rank of a torchrun launch; LaunchError for another
    launcher (its ranks would not find each other)."""
    world = launched_as_ranks(environ)
    if world == 1:
        return None
    missing = [name for name in TORCHRUN_VARIABLES if name not in environ]
    if missing:
        raise LaunchError(f"launched as {world} processes without torchrun's environment "
                          f"({', '.join(missing)} unset: mpirun, srun or similar); {TORCHRUN_HINT}")
    return Launch(int(environ["WORLD_SIZE"]), int(environ["RANK"]), int(environ["LOCAL_RANK"]))


def torchrun_command(nproc: int, argv: list[str]) -> list[str]:
    """The command running ``ditplan <argv>`` as ``nproc`` ranks on this host."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc-per-node={nproc}", "-m", "ditplan.runtime.cli", *argv]


def relaunch(nproc: int, argv: list[str]) -> int:
    """Run ``ditplan <argv>`` under torchrun as ``nproc`` ranks; torchrun's exit status."""
    return subprocess.run(torchrun_command(nproc, argv), check=False).returncode


def without_option(argv: list[str], option: str) -> list[str]:
    """``argv`` without ``option VALUE`` / ``option=VALUE``."""
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == option:
            skip = True
        elif not arg.startswith(option + "="):
            kept.append(arg)
    return kept


@contextmanager
def joined(launch: Launch, device: str):
    """In the launch's process group (NCCL on CUDA, gloo on CPU), left on exit when joined
    here; yields this rank's device."""
    import torch
    import torch.distributed as dist

    if torch.device(device).type == "cuda":
        gpus = torch.cuda.device_count()
        if launch.local_rank >= gpus:
            raise LaunchError(f"rank {launch.rank} is local rank {launch.local_rank} but this "
                              f"host has {gpus} GPU(s): launch at most {gpus} processes per host")
        torch.cuda.set_device(launch.local_rank)
        device, backend = f"cuda:{launch.local_rank}", "nccl"
    else:
        backend = "gloo"
    owned = not dist.is_initialized()
    if owned:
        dist.init_process_group(backend)
    try:
        yield device
    finally:
        if owned:
            dist.destroy_process_group()
