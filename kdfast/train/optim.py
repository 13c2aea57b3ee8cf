"""The optimizers and learning-rate schedules of the training layer, shared by
:class:`~kdfast.train.Distiller` and the trainer integrations."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

__all__ = ["OPTIMIZERS", "SCHEDULES", "build_optimizer", "build_scheduler", "check_specs", "lr_factor"]

OPTIMIZERS = ("adamw", "adam", "sgd")
SCHEDULES = ("constant", "cosine", "linear")

OptimizerSpec = str | Callable[[list[dict[str, Any]]], torch.optim.Optimizer]
SchedulerSpec = str | Callable[[torch.optim.Optimizer], Any] | None


def check_specs(owner: str, optimizer: Any, scheduler: Any) -> None:
    """Raise a ``ValueError`` naming ``owner`` for an unknown optimizer or schedule."""
    if optimizer not in OPTIMIZERS and not callable(optimizer):
        raise ValueError(f"{owner}: optimizer must be one of {OPTIMIZERS} or a callable, got {optimizer!r}")
    if (isinstance(scheduler, str) and scheduler not in SCHEDULES) or \
            (not isinstance(scheduler, str) and scheduler is not None and not callable(scheduler)):
        raise ValueError(f"{owner}: scheduler must be one of {SCHEDULES}, a callable or None, "
                         f"got {scheduler!r}")


def build_optimizer(params: Sequence[nn.Parameter], spec: OptimizerSpec, *, lr: float,
                    weight_decay: float) -> torch.optim.Optimizer:
    """AdamW / Adam / SGD (momentum 0.9) or ``spec(param_groups)``, with weight decay on
    the matrices and none on biases and norms (parameters with fewer than 2 dims)."""
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [g for g in ({"params": decay, "weight_decay": weight_decay},
                          {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
    if callable(spec):
        return spec(groups)
    if spec == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=0.9)
    if spec == "adam":
        return torch.optim.Adam(groups, lr=lr)
    return torch.optim.AdamW(groups, lr=lr)


def lr_factor(kind: str | None, warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """The learning-rate multiplier per optimizer step: linear warm-up over
    ``warmup_steps``, then constant, cosine or linear decay to 0 at ``total_steps``.

    Example::

        >>> f = lr_factor("cosine", 2, 10)
        >>> [round(f(s), 3) for s in (0, 1, 2, 6, 10)]
        [0.5, 1.0, 1.0, 0.5, 0.0]
    """
    warm, total = warmup_steps, max(total_steps, 1)

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        frac = min((step - warm) / max(total - warm, 1), 1.0)
        if kind == "cosine":
            return 0.5 * (1 + math.cos(math.pi * frac))
        return 1.0 - frac if kind == "linear" else 1.0
    return factor


def build_scheduler(optimizer: torch.optim.Optimizer, spec: SchedulerSpec, *, warmup_steps: int,
                    total_steps: int) -> Any:
    """``spec(optimizer)``, a ``LambdaLR`` over :func:`lr_factor`, or ``None`` for a
    constant rate without warm-up."""
    if callable(spec):
        return spec(optimizer)
    if spec in ("cosine", "linear") or warmup_steps:
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(spec, warmup_steps, total_steps))
    return None
