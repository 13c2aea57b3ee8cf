"""``nn.Module`` drop-ins for the kdfast loss functions."""

from __future__ import annotations

import torch
from torch import nn

from kdfast._args import check_options
from kdfast.functional import kd_loss

__all__ = ["KDLoss"]


class KDLoss(nn.Module):
    """Module form of :func:`kdfast.kd_loss`; the options are fixed at construction.

    Shapes: ``student_logits``, ``teacher_logits`` ``[..., V]``; ``labels`` ``[...]``.

    Example::

        >>> crit = kdfast.KDLoss(temperature=4.0, alpha=0.1)
        >>> loss = crit(student_logits, teacher_logits, labels)
    """

    def __init__(self, temperature: float = 1.0, alpha: float = 0.0,
                 divergence: str = "forward_kl", beta: float = 0.5, ignore_index: int = -100,
                 reduction: str = "batchmean", softcap: float | None = None) -> None:
        super().__init__()
        check_options(temperature, alpha, divergence, beta, reduction, ignore_index, softcap)
        self.temperature = temperature
        self.alpha = alpha
        self.divergence = divergence
        self.beta = beta
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.softcap = softcap

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                labels: torch.Tensor | None = None) -> torch.Tensor:
        return kd_loss(student_logits, teacher_logits, labels, temperature=self.temperature,
                       alpha=self.alpha, divergence=self.divergence, beta=self.beta,
                       ignore_index=self.ignore_index, reduction=self.reduction,
                       softcap=self.softcap)

    def extra_repr(self) -> str:
        beta = f", beta={self.beta}" if self.divergence == "jsd" else ""
        cap = f", softcap={self.softcap}" if self.softcap is not None else ""
        return (f"temperature={self.temperature}, alpha={self.alpha}, "
                f"divergence={self.divergence!r}{beta}, ignore_index={self.ignore_index}, "
                f"reduction={self.reduction!r}{cap}")
