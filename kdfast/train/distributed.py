"""Data parallelism for the training layer (``torchrun``, any ``torch.distributed`` backend).

:class:`~kdfast.train.Distiller` runs data-parallel by itself when a process group with
more than one process is initialised (:func:`init_distributed` starts one from the
environment ``torchrun`` sets):

- every process starts from rank 0's parameters and buffers (:func:`broadcast_modules`);
- each DataLoader is re-built over this rank's shard (:func:`shard_loader`): training data
  with a ``DistributedSampler`` whose order depends only on its seed and the epoch, so the
  sequence of *global* batches (``batch_size x world_size`` samples) is the same for every
  world size; evaluation data split without padding, so every sample counts once;
- gradients are averaged over the processes once per optimizer step, after the last
  micro-batch of a gradient-accumulation cycle (:func:`all_reduce_gradients`): the step
  equals one process's step on the global batch;
- only rank 0 shows progress and writes checkpoints and logs; the logged loss and its
  parts are averaged over the processes and evaluation metrics are reduced
  (:meth:`kdfast.train.metrics.MetricTracker.all_reduce`).

This is plain data parallelism without ``DistributedDataParallel``'s overlap of
communication with the backward pass: one bucketed all-reduce per optimizer step, which
also copes with parameters that some steps do not use (every mode's parts train as-is).
BatchNorm statistics stay per process, as with DDP.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable, Iterator, Sequence
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import (
    DataLoader,
    DistributedSampler,
    IterableDataset,
    RandomSampler,
    Sampler,
    SequentialSampler,
)

__all__ = ["ShardSampler", "all_gather_objects", "all_reduce_gradients", "barrier", "broadcast_modules",
           "init_distributed", "is_distributed", "is_main_process", "rank", "set_epoch", "shard_loader",
           "world_size"]

#: Elements per all-reduce bucket of :func:`all_reduce_gradients` (bounds the extra memory).
BUCKET_ELEMENTS = 1 << 24


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


def all_gather_objects(obj: Any) -> list[Any]:
    """``[obj of rank 0, obj of rank 1, ...]`` (pickled; ``[obj]`` without a process group).
    For small things on rare occasions (log steps, checkpoints): it synchronises the host."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _comm_device(tensor: torch.Tensor) -> torch.device:
    """Where a collective's tensors must live: CUDA for NCCL, else the tensor's device."""
    if dist.get_backend() == "nccl" and tensor.device.type != "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return tensor.device


def broadcast_modules(modules: Iterable[nn.Module], src: int = 0) -> None:
    """Copy rank ``src``'s parameters and buffers into every process's ``modules`` (in place;
    the parameter objects stay the same). A no-op without a process group."""
    if not is_distributed():
        return
    seen: set[int] = set()
    with torch.no_grad():
        for module in modules:
            for tensor in [*module.parameters(), *module.buffers()]:
                if id(tensor) in seen or tensor.numel() == 0:
                    continue
                seen.add(id(tensor))
                device = _comm_device(tensor)
                buf = tensor.detach() if device == tensor.device and tensor.is_contiguous() \
                    else tensor.detach().to(device).contiguous()
                dist.broadcast(buf, src)
                if buf is not tensor.data and buf.data_ptr() != tensor.data_ptr():
                    tensor.copy_(buf)


def all_reduce_gradients(params: Sequence[nn.Parameter]) -> None:
    """Average the gradients of ``params`` over the processes, in place.

    A parameter that has no gradient on any process keeps ``grad=None`` (so optimizers
    skip it, as they would in one process); one that has a gradient on some processes
    only gets the mean with zeros for the others. Gradients are reduced in buckets of
    at most :data:`BUCKET_ELEMENTS` elements per dtype and device. A no-op without a
    process group.
    """
    if not is_distributed() or not params:
        return
    world = dist.get_world_size()
    for p in params:
        if p.grad is not None and p.grad.is_sparse:
            raise NotImplementedError("all_reduce_gradients: sparse gradients are not supported "
                                      "(use a dense embedding under torchrun)")
    has = torch.tensor([p.grad is not None for p in params], dtype=torch.int32)
    has = has.to(_comm_device(params[0]))
    dist.all_reduce(has, op=dist.ReduceOp.MAX)
    used = [p for p, flag in zip(params, has.tolist()) if flag]
    groups: dict[tuple[torch.device, torch.dtype], list[nn.Parameter]] = {}
    for p in used:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        groups.setdefault((p.grad.device, p.grad.dtype), []).append(p)
    for members in groups.values():
        bucket: list[nn.Parameter] = []
        size = 0
        for p in [*members, None]:
            if p is not None and (not bucket or size + p.numel() <= BUCKET_ELEMENTS):
                bucket.append(p)
                size += p.numel()
                continue
            _reduce_bucket(bucket, world)
            bucket, size = ([p], p.numel()) if p is not None else ([], 0)
        if bucket:
            _reduce_bucket(bucket, world)


def _reduce_bucket(bucket: list[nn.Parameter], world: int) -> None:
    grads = [p.grad for p in bucket]
    device = _comm_device(grads[0])
    flat = torch.cat([g.reshape(-1).to(device) for g in grads])
    dist.all_reduce(flat)
    flat.div_(world)
    offset = 0
    for g in grads:
        n = g.numel()
        g.copy_(flat[offset:offset + n].view_as(g))
        offset += n


class ShardSampler(Sampler[int]):
    """Indices ``rank, rank + world, rank + 2 world, ...`` of ``range(length)``: every
    sample exactly once over all processes, without the padding of ``DistributedSampler``
    (for evaluation, where the shards may differ in size by one).

    Example::

        >>> list(ShardSampler(10, rank=1, world=4))
        [1, 5, 9]
    """

    def __init__(self, length: int, *, rank: int, world: int) -> None:
        if world < 1 or not 0 <= rank < world:
            raise ValueError(f"ShardSampler: need 0 <= rank < world, got rank={rank}, world={world}")
        self.length, self.rank, self.world = length, rank, world

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.length, self.world))

    def __len__(self) -> int:
        return len(range(self.rank, self.length, self.world))


_LOADER_OPTIONS = ("num_workers", "collate_fn", "pin_memory", "drop_last", "timeout", "worker_init_fn",
                   "multiprocessing_context", "generator", "persistent_workers", "pin_memory_device")


def shard_loader(data: Any, *, train: bool, seed: int = 0, num_replicas: int | None = None,
                 rank_: int | None = None) -> Any:
    """``data`` re-built to yield this process's shard (``data`` itself where that is not
    needed or not possible).

    - A ``DataLoader`` over a map-style dataset with a random or sequential sampler gets a
      ``DistributedSampler`` (``train=True``; shuffled with ``seed`` and the epoch when the
      original shuffled, padded by repeating samples so all shards have the same length)
      or a :class:`ShardSampler` (``train=False``); every other option is kept, and
      ``batch_size`` is per process.
    - A loader whose sampler already is a ``DistributedSampler`` or :class:`ShardSampler`,
      and one over an ``IterableDataset`` (which must shard itself, with a warning), are
      returned as they are; :func:`kdfast.train.paired` is sharded loader by loader.
    - Any other sampler (weighted, subset, a custom batch sampler) raises a ``ValueError``:
      shard it yourself and pass ``shard_data=False`` to the Distiller.

    ``num_replicas`` / ``rank_`` default to the process group's (1 / 0 without one).
    """
    from kdfast.train._batch import paired

    world = world_size() if num_replicas is None else num_replicas
    me = rank() if rank_ is None else rank_
    if isinstance(data, paired):
        return paired(shard_loader(data.source, train=train, seed=seed, num_replicas=world, rank_=me),
                      shard_loader(data.target, train=train, seed=seed, num_replicas=world, rank_=me),
                      length=data.length)
    if not isinstance(data, DataLoader):
        warnings.warn(f"kdfast: training data of type {type(data).__name__} is not a DataLoader and is "
                      "used as it is on every process; make sure it yields this process's shard",
                      stacklevel=3)
        return data
    if isinstance(data.dataset, IterableDataset):
        warnings.warn("kdfast: a DataLoader over an IterableDataset is used as it is on every process; "
                      "the dataset must yield this process's shard", stacklevel=3)
        return data
    sampler = data.sampler
    if isinstance(sampler, (DistributedSampler, ShardSampler)):
        return data
    if data.batch_size is None or not isinstance(sampler, (RandomSampler, SequentialSampler)):
        raise ValueError(
            f"kdfast: cannot shard a DataLoader with a {type(data.batch_sampler).__name__} / "
            f"{type(sampler).__name__} across processes; give each process its own loader "
            "(e.g. with a DistributedSampler) and pass shard_data=False")
    if isinstance(sampler, RandomSampler) and (sampler.replacement or sampler._num_samples is not None):
        raise ValueError("kdfast: cannot shard a DataLoader whose RandomSampler draws with replacement "
                         "or a set number of samples; shard it yourself and pass shard_data=False")
    if train:
        new_sampler: Sampler[int] = DistributedSampler(
            data.dataset, num_replicas=world, rank=me, shuffle=isinstance(sampler, RandomSampler),
            seed=seed)
    else:
        new_sampler = ShardSampler(len(data.dataset), rank=me, world=world)
    options = {k: getattr(data, k) for k in _LOADER_OPTIONS if hasattr(data, k)}
    if data.num_workers > 0:
        options["prefetch_factor"] = data.prefetch_factor
    return DataLoader(data.dataset, batch_size=data.batch_size, sampler=new_sampler, **options)


def set_epoch(data: Any, epoch: int) -> None:
    """Tell the ``DistributedSampler`` (s) of ``data`` which epoch starts (its shuffle seed)."""
    from kdfast.train._batch import paired

    if isinstance(data, paired):
        set_epoch(data.source, epoch)
        set_epoch(data.target, epoch)
        return
    sampler = getattr(data, "sampler", None)
    if hasattr(sampler, "set_epoch"):
        sampler.set_epoch(epoch)


def local_batch_size(data: Any) -> int | None:
    """The per-process batch size of a DataLoader (``None`` when unknown)."""
    return getattr(data, "batch_size", None) if isinstance(data, DataLoader) else None
