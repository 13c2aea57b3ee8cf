"""torch.distributed helpers of the training layer (``torchrun`` / DDP).

:class:`~kdfast.train.Distiller` runs distributed by itself when a process group is
initialised; :func:`init_distributed` starts one from the environment ``torchrun`` sets.
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist

__all__ = ["barrier", "init_distributed", "is_distributed", "is_main_process", "rank", "world_size"]


def is_distributed() -> bool:
    """Whether a ``torch.distributed`` process group is initialised with more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's global rank (0 without a process group)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    """The number of processes (1 without a process group)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main_process() -> bool:
    """Rank 0: the process that writes checkpoints, logs and progress bars."""
    return rank() == 0


def barrier() -> None:
    """Wait for every process (a no-op without a process group)."""
    if is_distributed():
        dist.barrier()


def init_distributed(backend: str | None = None, *, timeout_s: float = 1800.0) -> bool:
    """Initialise the default process group from ``torchrun``'s environment
    (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``, ``LOCAL_RANK``).

    Does nothing and returns ``False`` when ``WORLD_SIZE`` is unset or 1, or when a group
    already exists. ``backend`` defaults to ``"nccl"`` when CUDA is available, else
    ``"gloo"``; with NCCL the process's CUDA device is set to ``LOCAL_RANK``.

    Returns:
        ``True`` when this call started the process group (call
        ``torch.distributed.destroy_process_group()`` at the end).
    """
    if not dist.is_available() or dist.is_initialized():
        return False
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    return True
