"""Response-based distillation: soft labels (Hinton) and hard labels (teacher argmax)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from kdfast.train.modes.base import DistillMode, StepOutput, check_choice, check_classes, check_real

__all__ = ["Hard", "Soft"]

_DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")


class Soft(DistillMode):
    r"""Soft-label distillation (Hinton, Vinyals & Dean, "Distilling the Knowledge in a
    Neural Network", 2015): the student matches the teacher's temperature-softened
    distribution, blended with the cross-entropy on the true labels::

        loss = (1 - alpha) * T^2 * KL(softmax(t / T) || softmax(s / T)) + alpha * CE(s, y)

    with :func:`kdfast.kd_loss` (one fused call when every row is labelled). Unlabelled
    rows (label ``ignore_index``, or no labels at all) still get the divergence, which
    is what lets a student learn from a teacher on data the labels do not cover; then
    the divergence is averaged over all rows and the cross-entropy over the labelled ones.

    Args:
        teacher: the frozen teacher (``[..., C]`` logits like the student's).
        temperature: ``T > 0``.
        alpha: weight of the hard-label cross-entropy, in ``[0, 1]``.
        divergence: ``"forward_kl"``, ``"reverse_kl"`` or ``"jsd"`` (see ``kd_loss``).
        beta: the JSD mixture weight.
        softcap: logit soft-capping as in ``kd_loss``.
        backend, ignore_index, forward: see :class:`DistillMode`.

    Example::

        >>> teacher, student = torch.nn.Linear(8, 5), torch.nn.Linear(8, 5)
        >>> mode = kdfast.train.Soft(teacher, temperature=4.0, alpha=0.5)
        >>> out = mode(student, (torch.randn(16, 8), torch.randint(0, 5, (16,))))
        >>> out.loss.backward()
    """

    name = "soft"

    def __init__(self, teacher: nn.Module, *, temperature: float = 4.0, alpha: float = 0.1,
                 divergence: str = "forward_kl", beta: float = 0.5, softcap: float | None = None,
                 backend: str = "kdfast", ignore_index: int = -100,
                 forward: Callable[[nn.Module, Any], torch.Tensor] | None = None) -> None:
        super().__init__(teacher, backend=backend, ignore_index=ignore_index, forward=forward)
        self.temperature = check_real("Soft", "temperature", temperature, low=0.0, low_open=True)
        self.alpha = check_real("Soft", "alpha", alpha, low=0.0, high=1.0)
        self.divergence = check_choice("Soft", "divergence", divergence, _DIVERGENCES)
        self.beta = check_real("Soft", "beta", beta, low=0.0, high=1.0, low_open=True, high_open=True)
        self.softcap = None if softcap is None else check_real("Soft", "softcap", softcap, low=0.0,
                                                               low_open=True)

    def loss_from_logits(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                         labels: torch.Tensor | None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The soft-label loss for given logits (used by modes built on this one)."""
        return self.soft_loss(student_logits, teacher_logits, labels, temperature=self.temperature,
                              alpha=self.alpha, divergence=self.divergence, beta=self.beta,
                              softcap=self.softcap)

    def forward(self, student: nn.Module, batch: Any) -> StepOutput:
        inputs, labels = self.unpack(batch)
        t = self.teacher_logits(inputs)
        s = self.logits(student, inputs)
        loss, parts = self.loss_from_logits(s, t, labels)
        return StepOutput(loss, s, labels, parts)

    def extra_repr(self) -> str:
        return (f"temperature={self.temperature}, alpha={self.alpha}, divergence={self.divergence!r}, "
                f"{super().extra_repr()}")


class Hard(DistillMode):
    r"""Hard-label distillation: the teacher's argmax as the label (pseudo-labelling).

    Rows where the teacher's top probability (at temperature 1) is below ``threshold``
    are skipped. With ``use_labels=True`` a row's true label, where it has one, replaces
    the teacher's. The loss is the cross-entropy on those labels, computed by
    :func:`kdfast.kd_loss` with ``alpha=1`` (its fused hard-label term), averaged over the
    rows that have a label.

    Args:
        teacher: the frozen teacher.
        threshold: minimum teacher confidence in ``[0, 1)``; 0 keeps every row.
        use_labels: prefer the true labels where given.
        backend, ignore_index, forward: see :class:`DistillMode`.

    Example::

        >>> teacher, student = torch.nn.Linear(8, 5), torch.nn.Linear(8, 5)
        >>> out = kdfast.train.Hard(teacher, threshold=0.3)(student, (torch.randn(16, 8),))
        >>> out.parts["kept"].item() <= 1.0
        True
    """

    name = "hard"

    def __init__(self, teacher: nn.Module, *, threshold: float = 0.0, use_labels: bool = True,
                 backend: str = "kdfast", ignore_index: int = -100,
                 forward: Callable[[nn.Module, Any], torch.Tensor] | None = None) -> None:
        super().__init__(teacher, backend=backend, ignore_index=ignore_index, forward=forward)
        self.threshold = check_real("Hard", "threshold", threshold, low=0.0, high=1.0, high_open=True)
        if not isinstance(use_labels, bool):
            raise TypeError(f"Hard: use_labels must be a bool, got {type(use_labels).__name__}")
        self.use_labels = use_labels

    def pseudo_labels(self, teacher_logits: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        """The labels the student learns: teacher argmax, ``ignore_index`` where the
        teacher is unsure, true labels where given (``use_labels``)."""
        conf, pseudo = torch.softmax(teacher_logits.float(), dim=-1).max(dim=-1)
        pseudo = pseudo.masked_fill(conf < self.threshold, self.ignore_index)
        if self.use_labels and labels is not None:
            pseudo = torch.where(labels != self.ignore_index, labels, pseudo)
        return pseudo

    def forward(self, student: nn.Module, batch: Any) -> StepOutput:
        inputs, labels = self.unpack(batch)
        t = self.teacher_logits(inputs)
        s = self.logits(student, inputs)
        check_classes("Hard", s, t)
        pseudo = self.pseudo_labels(t, labels)
        loss = self.losses.kd_loss(s, t, pseudo, alpha=1.0, ignore_index=self.ignore_index)
        kept = (pseudo != self.ignore_index).float().mean()
        return StepOutput(loss, s, labels, {"ce": loss.detach(), "kept": kept.detach()})

    def extra_repr(self) -> str:
        return f"threshold={self.threshold}, use_labels={self.use_labels}, {super().extra_repr()}"
