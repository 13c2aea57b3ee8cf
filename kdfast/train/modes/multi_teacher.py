"""Distillation from several teachers at once."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from kdfast.train.modes.base import DistillMode, StepOutput, check_choice, check_classes, check_real
from kdfast.train.modes.soft import _DIVERGENCES

__all__ = ["MultiTeacher"]

COMBINE = ("mean", "weighted", "confidence")
CONFIDENCE = ("entropy", "label")


class MultiTeacher(DistillMode):
    r"""Multi-teacher distillation: the student matches a fusion of the teachers'
    temperature-softened distributions,

    .. math:: \bar p(x) = \sum_k w_k(x)\, \mathrm{softmax}(t_k(x) / T),

    through :func:`kdfast.kd_loss` on the logits ``T log p̄`` (whose softmax at ``T`` is
    exactly ``p̄``; the log-sum is taken in log space, safe for tiny probabilities),
    blended with the cross-entropy as in :class:`Soft`. The weights, per ``combine``:

    * ``"mean"``: ``w_k = 1/K``, the averaged soft targets of an ensemble (Hinton et al.
      2015; You et al., "Learning from Multiple Teacher Networks", KDD 2017);
    * ``"weighted"``: fixed ``weights`` (normalised to sum to 1);
    * ``"confidence"``: per sample, knowledge fusion by teacher confidence,
      ``w_k(x) = softmax_k(-c_k(x) / tau)`` with ``c_k`` the teacher's predictive entropy
      at temperature 1 (``confidence="entropy"``, label-free), or its cross-entropy on the
      true label where the row has one (``confidence="label"``, as in CA-MKD, Zhang, Chen
      & Wang, "Confidence-Aware Multi-Teacher Knowledge Distillation", ICASSP 2022; rows
      without a label fall back to the entropy).

    Args:
        teachers: two or more frozen teachers with the student's classes.
        combine: ``"mean"``, ``"weighted"`` or ``"confidence"``.
        weights: one non-negative weight per teacher (``"weighted"`` only).
        confidence: ``"entropy"`` or ``"label"`` (``"confidence"`` only).
        tau: the confidence softmax temperature ``> 0``.
        temperature, alpha, divergence: of the distillation loss (see :class:`Soft`).
        backend, ignore_index, forward: see :class:`DistillMode`.

    Example::

        >>> teachers = [torch.nn.Linear(8, 5) for _ in range(3)]
        >>> mode = kdfast.train.MultiTeacher(teachers, combine="confidence")
        >>> out = mode(torch.nn.Linear(8, 5), (torch.randn(16, 8), torch.randint(0, 5, (16,))))
        >>> out.loss.backward()
    """

    name = "multi_teacher"

    def __init__(self, teachers: Sequence[nn.Module], *, combine: str = "mean",
                 weights: Sequence[float] | None = None, confidence: str = "entropy", tau: float = 1.0,
                 temperature: float = 4.0, alpha: float = 0.1, divergence: str = "forward_kl",
                 backend: str = "kdfast", ignore_index: int = -100,
                 forward: Callable[[nn.Module, Any], torch.Tensor] | None = None) -> None:
        super().__init__(teachers, backend=backend, ignore_index=ignore_index, forward=forward)
        fn = "MultiTeacher"
        if len(self.teachers) < 2:
            raise ValueError(f"{fn}: teachers must hold at least two models, got {len(self.teachers)}")
        self.combine = check_choice(fn, "combine", combine, COMBINE)
        if combine == "weighted":
            if weights is None or len(weights) != len(self.teachers):
                raise ValueError(f"{fn}: combine='weighted' needs weights, one per teacher "
                                 f"({len(self.teachers)}), got {weights!r}")
            ws = [check_real(fn, f"weights[{i}]", w, low=0.0) for i, w in enumerate(weights)]
            if sum(ws) <= 0:
                raise ValueError(f"{fn}: weights must not all be 0")
            self.weights = [w / sum(ws) for w in ws]
        elif weights is not None:
            raise ValueError(f"{fn}: weights are used only with combine='weighted', got combine={combine!r}")
        else:
            self.weights = [1.0 / len(self.teachers)] * len(self.teachers)
        self.confidence = check_choice(fn, "confidence", confidence, CONFIDENCE)
        self.tau = check_real(fn, "tau", tau, low=0.0, low_open=True)
        self.temperature = check_real(fn, "temperature", temperature, low=0.0, low_open=True)
        self.alpha = check_real(fn, "alpha", alpha, low=0.0, high=1.0)
        self.divergence = check_choice(fn, "divergence", divergence, _DIVERGENCES)

    def teacher_weights(self, teacher_logits: list[torch.Tensor],
                        labels: torch.Tensor | None) -> torch.Tensor:
        """``[K, ...]`` log-weights of the teachers per row (rows sum to 1 in probability)."""
        k = len(teacher_logits)
        rows = teacher_logits[0].shape[:-1]
        device = teacher_logits[0].device
        if self.combine != "confidence":
            w = torch.tensor(self.weights, dtype=torch.float32, device=device)
            return w.clamp_min(1e-30).log().view(k, *([1] * len(rows))).expand(k, *rows)
        logp = torch.stack([torch.log_softmax(t.float(), dim=-1) for t in teacher_logits])  # [K, ..., C]
        cost = -(logp.exp() * logp).sum(-1)                                                 # entropy
        if self.confidence == "label" and labels is not None:
            labelled = labels != self.ignore_index
            idx = labels.clamp_min(0).unsqueeze(0).unsqueeze(-1).expand(k, *rows, 1)
            ce = -logp.gather(-1, idx).squeeze(-1)
            cost = torch.where(labelled.unsqueeze(0), ce, cost)
        return torch.log_softmax(-cost / self.tau, dim=0)

    def fused_teacher_logits(self, teacher_logits: list[torch.Tensor],
                             labels: torch.Tensor | None) -> torch.Tensor:
        """``T log p̄``: logits whose softmax at ``T`` is the fused teacher distribution."""
        log_w = self.teacher_weights(teacher_logits, labels)
        logp = torch.stack([torch.log_softmax(t.float() / self.temperature, dim=-1) for t in teacher_logits])
        return self.temperature * torch.logsumexp(logp + log_w.unsqueeze(-1), dim=0)

    def forward(self, student: nn.Module, batch: Any) -> StepOutput:
        inputs, labels = self.unpack(batch)
        ts = [self.teacher_logits(inputs, t) for t in self.teachers]
        s = self.logits(student, inputs)
        for i, t in enumerate(ts):
            check_classes("MultiTeacher", s, t, f"teacher {i}")
        fused = self.fused_teacher_logits(ts, labels)
        loss, parts = self.soft_loss(s, fused, labels, temperature=self.temperature, alpha=self.alpha,
                                     divergence=self.divergence)
        if self.combine == "confidence":
            w = self.teacher_weights(ts, labels).exp().reshape(len(ts), -1).mean(1)
            parts.update({f"w{i}": w[i].detach() for i in range(len(ts))})
        return StepOutput(loss, s, labels, parts)

    def extra_repr(self) -> str:
        return (f"combine={self.combine!r}, temperature={self.temperature}, alpha={self.alpha}, "
                f"{super().extra_repr()}")


