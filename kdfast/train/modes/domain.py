"""Domain adaptation by distillation: adversarial (gradient reversal) and cross-domain modes."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from kdfast.train.hooks import FeatureTap
from kdfast.train.modes.base import DistillMode, StepOutput, check_classes, check_real

__all__ = ["Adversarial", "CrossDomain", "GradientReversal", "grad_reverse"]


class GradientReversal(torch.autograd.Function):
    r"""The gradient-reversal layer (Ganin & Lempitsky, "Unsupervised Domain Adaptation by
    Backpropagation", ICML 2015): the identity in the forward pass, ``-coeff`` times the
    incoming gradient in the backward pass (no gradient for ``coeff``).

    Use through :func:`grad_reverse`.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, coeff: float) -> torch.Tensor:
        ctx.coeff = coeff
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad * -ctx.coeff, None


def grad_reverse(x: torch.Tensor, coeff: float = 1.0) -> torch.Tensor:
    """``x`` unchanged, with the gradient flowing back through it multiplied by ``-coeff``.

    Args:
        x: any tensor.
        coeff: the reversal coefficient ``>= 0`` (Ganin & Lempitsky's ``lambda``).

    Example::

        >>> x = torch.ones(3, requires_grad=True)
        >>> grad_reverse(x, 0.5).sum().backward()
        >>> x.grad
        tensor([-0.5000, -0.5000, -0.5000])
    """
    coeff = check_real("grad_reverse", "coeff", coeff, low=0.0)
    return GradientReversal.apply(x, coeff)


def _domain_batches(fn: str, batch: Any, *, source_required: bool) -> tuple[Any | None, Any]:
    """``(source, target)`` of a ``{"source": ..., "target": ...}`` batch."""
    example = "{'source': (x_s, y_s), 'target': (x_t, ...)} (kdfast.train.paired(source, target) yields it)"
    if not isinstance(batch, Mapping) or not ({"source", "target"} & set(batch)):
        keys = f" with keys {sorted(batch)}" if isinstance(batch, Mapping) else ""
        raise ValueError(f"{fn}: a batch must be a mapping {example}, got {type(batch).__name__}{keys}")
    if "target" not in batch:
        raise ValueError(f"{fn}: the batch has no 'target' key (keys {sorted(batch)}); expected {example}")
    if source_required and "source" not in batch:
        raise ValueError(f"{fn}: the batch has no 'source' key (keys {sorted(batch)}); expected {example}")
    return batch.get("source"), batch["target"]


def _source_loss(mode: DistillMode, s: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None,
                 temperature: float, alpha: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The soft loss on the labelled source rows, with ``kd`` and ``ce`` reported apart even
    when one fused call computes both (the mean of the fused rows is exactly
    ``(1 - alpha) kd + alpha ce``)."""
    loss, parts = mode.soft_loss(s, t, labels, temperature=temperature, alpha=alpha)
    if alpha > 0 and labels is not None and "ce" not in parts:
        with torch.no_grad():
            ce = mode.cross_entropy(s.detach(), labels)
            parts = {"ce": ce}
            if alpha < 1:
                parts["kd"] = (loss.detach() - alpha * ce) / (1 - alpha)
    return loss, parts


class Adversarial(DistillMode):
    r"""Domain-adversarial distillation: a student learns from a teacher trained on a
    labelled source domain, while a domain discriminator behind a gradient-reversal
    layer makes the student's features indistinguishable between the source and an
    unlabelled target domain (DANN, Ganin & Lempitsky, "Unsupervised Domain Adaptation
    by Backpropagation", ICML 2015), combined with distillation from the source teacher
    as in AAD (Ryu & Lee, "Knowledge Distillation for BERT Unsupervised Domain
    Adaptation", 2020)::

        loss = (1 - alpha) T^2 KL(p_t(x_s) || q_s(x_s)) + alpha CE(s(x_s), y_s)      (source)
             + target_kd_weight * T^2 KL(p_t(x_t) || q_s(x_t))                       (target)
             + domain_weight * BCE(D(GRL_lambda(f(x))), d)     d = 0 on source rows, 1 on target

    with ``p, q`` the softmaxes at temperature ``T`` (:func:`kdfast.kd_loss`), ``f`` the
    output of the student's module at ``feature_path`` flattened to ``[N, D]``, and the
    BCE with logits averaged over the source and target rows together. ``GRL_lambda``
    (:func:`grad_reverse`) is the identity forward; backward it multiplies the gradient
    by ``-lambda``: the discriminator (the mode's parameter, trained by the optimizer)
    descends the domain loss, the student's layers up to ``feature_path`` ascend it
    (scaled by ``lambda``); the layers after ``feature_path`` get no domain gradient.
    ``lambda`` follows the paper's schedule ``lambda_p = grl_lambda * (2 / (1 + exp(-gamma
    p)) - 1)`` with ``p = min(step / total_steps, 1)`` the training progress (0 on the first
    step), or is the constant ``grl_lambda`` when ``total_steps`` is ``None``.

    The target term distils the teacher's soft labels on the target inputs too (on by
    default; ``target_kd_weight=0`` keeps distillation on the source only). Target
    labels, when the target batches have them, are never used for training (they go to
    :class:`StepOutput` for monitoring). The step counter is a buffer, saved in
    checkpoints. Both domains go through the student in separate forward passes (batch
    normalisation sees one domain at a time).

    Args:
        teacher: the frozen teacher, trained on the source domain.
        feature_path: dotted path of the student module whose output is the feature
            (``""``: the whole student, i.e. the logits).
        discriminator: a module mapping ``[N, D]`` features to ``[N, 1]`` (or ``[N]``)
            domain logits; default: ``Linear(D, hidden) - ReLU - Linear(hidden, 1)`` built
            by :meth:`prepare` from the feature width ``D``.
        hidden: width of the default discriminator.
        domain_weight: weight ``>= 0`` of the domain loss.
        target_kd_weight: weight ``>= 0`` of the target distillation term.
        temperature: ``T > 0``.
        alpha: weight in ``[0, 1]`` of the cross-entropy on the source labels.
        grl_lambda: the final (or constant) reversal coefficient ``>= 0``.
        gamma: the schedule's steepness ``> 0`` (the paper: 10).
        total_steps: optimizer steps of the whole run, for the schedule; ``None``: constant.
        backend, ignore_index, forward: see :class:`DistillMode`.

    Batches are ``{"source": (x_s, y_s), "target": (x_t, ...)}``, as yielded by
    :func:`kdfast.train.paired`. Call :meth:`prepare` (the :class:`~kdfast.train.Distiller`
    does) before building the optimizer, so that the default discriminator exists, and
    :meth:`end_step` after every optimizer step.

    Example::

        >>> teacher = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 3))
        >>> student = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
        >>> mode = kdfast.train.Adversarial(teacher, "1", hidden=32, total_steps=1000)
        >>> batch = {"source": (torch.randn(16, 8), torch.randint(0, 3, (16,))),
        ...          "target": (torch.randn(16, 8) + 1.0,)}
        >>> mode.prepare(student, batch)                  # builds the 16 -> 32 -> 1 discriminator
        >>> out = mode(student, batch)
        >>> out.loss.backward()
        >>> sorted(out.parts)
        ['ce', 'domain', 'domain_acc', 'grl', 'kd', 'target_kd']
    """

    name = "adversarial"

    def __init__(self, teacher: nn.Module, feature_path: str, *, discriminator: nn.Module | None = None,
                 hidden: int = 256, domain_weight: float = 1.0, target_kd_weight: float = 1.0,
                 temperature: float = 4.0, alpha: float = 0.1, grl_lambda: float = 1.0, gamma: float = 10.0,
                 total_steps: int | None = None, backend: str = "kdfast", ignore_index: int = -100,
                 forward: Callable[[nn.Module, Any], torch.Tensor] | None = None) -> None:
        super().__init__(teacher, backend=backend, ignore_index=ignore_index, forward=forward)
        fn = "Adversarial"
        if not isinstance(feature_path, str):
            raise TypeError(f"{fn}: feature_path must be a str (a dotted module path), "
                            f"got {type(feature_path).__name__}")
        self.feature_path = feature_path
        if discriminator is not None and not isinstance(discriminator, nn.Module):
            raise TypeError(f"{fn}: discriminator must be an nn.Module or None, "
                            f"got {type(discriminator).__name__}")
        if isinstance(hidden, bool) or not isinstance(hidden, int) or hidden < 1:
            raise ValueError(f"{fn}: hidden must be an int >= 1, got {hidden!r}")
        self.hidden = hidden
        self.domain_weight = check_real(fn, "domain_weight", domain_weight, low=0.0)
        self.target_kd_weight = check_real(fn, "target_kd_weight", target_kd_weight, low=0.0)
        self.temperature = check_real(fn, "temperature", temperature, low=0.0, low_open=True)
        self.alpha = check_real(fn, "alpha", alpha, low=0.0, high=1.0)
        self.grl_lambda = check_real(fn, "grl_lambda", grl_lambda, low=0.0)
        self.gamma = check_real(fn, "gamma", gamma, low=0.0, low_open=True)
        if total_steps is not None and (isinstance(total_steps, bool) or not isinstance(total_steps, int)
                                        or total_steps < 1):
            raise ValueError(f"{fn}: total_steps must be an int >= 1 or None, got {total_steps!r}")
        self.total_steps = total_steps
        self.register_module("discriminator", discriminator)
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))
        self._tap: tuple[int, FeatureTap] | None = None

    # -- pieces ------------------------------------------------------------------------------

    def grl_coefficient(self, step: int | None = None) -> float:
        """The reversal coefficient at ``step`` (default: the steps taken so far)."""
        if self.total_steps is None:
            return self.grl_lambda
        t = int(self.steps) if step is None else step
        p = min(t / self.total_steps, 1.0)
        return self.grl_lambda * (2.0 / (1.0 + math.exp(-self.gamma * p)) - 1.0)

    def _student_tap(self, student: nn.Module) -> FeatureTap:
        if self._tap is None or self._tap[0] != id(student):
            if self._tap is not None:
                self._tap[1].remove()
            role = f"{type(self).__name__}: the student (feature_path)"
            self._tap = (id(student), FeatureTap(student, [self.feature_path], role=role))
        return self._tap[1]

    def _run(self, student: nn.Module, inputs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """The student's logits on ``inputs`` and its features there, ``[N, D]``."""
        tap = self._student_tap(student)
        tap.clear()
        logits = self.logits(student, inputs)
        feats = tap[self.feature_path]
        tap.clear()
        return logits, feats.reshape(feats.shape[0], -1)

    def domain_logits(self, feats: torch.Tensor, coeff: float) -> torch.Tensor:
        """The discriminator's logits ``[N]`` on features ``[N, D]`` behind the reversal."""
        if self.discriminator is None:
            raise RuntimeError("Adversarial: the discriminator does not exist yet; call "
                               "mode.prepare(student, batch) before building the optimizer")
        out = self.discriminator(grad_reverse(feats, coeff))
        if out.shape[0] != feats.shape[0] or out.numel() != feats.shape[0]:
            raise ValueError(f"Adversarial: the discriminator must map [N, D] features to [N, 1] or [N] "
                             f"logits; it maps {tuple(feats.shape)} to {tuple(out.shape)}")
        return out.reshape(-1)

    # -- the contract --------------------------------------------------------------------------

    def prepare(self, student: nn.Module, batch: Any) -> None:
        source, target = _domain_batches("Adversarial", batch, source_required=True)
        (x_s, _), (x_t, _) = self.unpack(source), self.unpack(target)
        with torch.no_grad():
            s_s, f_s = self._run(student, x_s)
            _, f_t = self._run(student, x_t)
            check_classes("Adversarial", s_s, self.teacher_logits(x_s))
        if f_s.shape[1] != f_t.shape[1]:
            raise ValueError(f"Adversarial: the features at {self.feature_path!r} have {f_s.shape[1]} values "
                             f"per source sample but {f_t.shape[1]} per target sample; the discriminator "
                             "needs one width (pool or pad sequences to equal length)")
        if self.discriminator is None:
            dtype = torch.float64 if f_s.dtype == torch.float64 else torch.float32
            self.discriminator = nn.Sequential(nn.Linear(f_s.shape[1], self.hidden), nn.ReLU(),
                                               nn.Linear(self.hidden, 1)).to(device=f_s.device, dtype=dtype)
        with torch.no_grad():
            self.domain_logits(f_s, 0.0)

    def forward(self, student: nn.Module, batch: Any) -> StepOutput:
        source, target = _domain_batches("Adversarial", batch, source_required=True)
        (x_s, y_s), (x_t, y_t) = self.unpack(source), self.unpack(target)
        s_s, f_s = self._run(student, x_s)
        s_t, f_t = self._run(student, x_t)
        loss, parts = _source_loss(self, s_s, self.teacher_logits(x_s), y_s, self.temperature, self.alpha)
        if self.target_kd_weight > 0:
            t_t = self.teacher_logits(x_t)
            check_classes("Adversarial", s_t, t_t)
            target_kd = self.losses.kd_loss(s_t, t_t, temperature=self.temperature)
            loss = loss + self.target_kd_weight * target_kd
            parts["target_kd"] = target_kd.detach()
        coeff = self.grl_coefficient()
        d = self.domain_logits(torch.cat([f_s, f_t]), coeff)
        domains = torch.cat([torch.zeros(f_s.shape[0], device=d.device),
                             torch.ones(f_t.shape[0], device=d.device)])
        domain = F.binary_cross_entropy_with_logits(d.float(), domains)
        loss = loss + self.domain_weight * domain
        parts["domain"] = domain.detach()
        parts["domain_acc"] = ((d.detach() > 0).float() == domains).float().mean()
        parts["grl"] = torch.tensor(coeff, device=d.device)
        return StepOutput(loss, s_t, y_t, parts)

    def end_step(self, student: nn.Module) -> None:
        """Count the step (the reversal schedule's progress)."""
        self.steps += 1

    def close(self) -> None:
        if self._tap is not None:
            self._tap[1].remove()
            self._tap = None

    def extra_repr(self) -> str:
        return (f"feature_path={self.feature_path!r}, domain_weight={self.domain_weight}, "
                f"target_kd_weight={self.target_kd_weight}, temperature={self.temperature}, "
                f"alpha={self.alpha}, grl_lambda={self.grl_lambda}, total_steps={self.total_steps}, "
                f"{super().extra_repr()}")


class CrossDomain(DistillMode):
    r"""Unsupervised domain adaptation by distillation: a teacher trained on a labelled
    source domain teaches a student on *unlabelled* target-domain data through its soft
    labels: the soft-label loss of Hinton, Vinyals & Dean ("Distilling the Knowledge in a
    Neural Network", 2015) computed on target-domain inputs::

        loss = T^2 KL(p_t(x_t) || q_s(x_t))                                            (target)
             + source_weight * [(1 - alpha) T^2 KL(p_t(x_s) || q_s(x_s)) + alpha CE(s(x_s), y_s)]

    with :func:`kdfast.kd_loss` (``p, q`` softmaxes at ``T``), the target term averaged over
    every row of the target batch; the source term only when the batch has a labelled
    source part.

    Batches: a plain target batch (a tensor, ``(x_t,)``, ``(x_t, y_t)`` or a mapping with
    ``"inputs"``), or ``{"target": ..., "source": (x_s, y_s)}`` (:func:`kdfast.train.paired`).
    Target labels are **never** used for training: they only come back in
    :class:`StepOutput` (``labels``, with the target ``logits``) for monitoring, so a
    labelled target set can be used to watch the adaptation.

    Args:
        teacher: the frozen teacher, trained on the source domain.
        temperature: ``T > 0``.
        source_weight: weight ``>= 0`` of the source term (0: ignore source batches).
        alpha: weight in ``[0, 1]`` of the cross-entropy on the source labels.
        backend, ignore_index, forward: see :class:`DistillMode`.

    Example::

        >>> teacher, student = torch.nn.Linear(8, 3), torch.nn.Linear(8, 3)
        >>> mode = kdfast.train.CrossDomain(teacher, temperature=2.0)
        >>> out = mode(student, (torch.randn(16, 8) + 1.0,))          # unlabelled target data
        >>> out.loss.backward()
        >>> out = mode(student, {"source": (torch.randn(16, 8), torch.randint(0, 3, (16,))),
        ...                      "target": (torch.randn(16, 8) + 1.0,)})
        >>> sorted(out.parts)
        ['ce', 'kd', 'target_kd']
    """

    name = "cross_domain"

    def __init__(self, teacher: nn.Module, *, temperature: float = 4.0, source_weight: float = 1.0,
                 alpha: float = 0.1, backend: str = "kdfast", ignore_index: int = -100,
                 forward: Callable[[nn.Module, Any], torch.Tensor] | None = None) -> None:
        super().__init__(teacher, backend=backend, ignore_index=ignore_index, forward=forward)
        fn = "CrossDomain"
        self.temperature = check_real(fn, "temperature", temperature, low=0.0, low_open=True)
        self.source_weight = check_real(fn, "source_weight", source_weight, low=0.0)
        self.alpha = check_real(fn, "alpha", alpha, low=0.0, high=1.0)

    def split(self, batch: Any) -> tuple[Any | None, Any]:
        """``(source or None, target)`` of a plain target batch or a domain mapping."""
        if isinstance(batch, Mapping) and ({"source", "target"} & set(batch)):
            return _domain_batches("CrossDomain", batch, source_required=False)
        return None, batch

    def forward(self, student: nn.Module, batch: Any) -> StepOutput:
        source, target = self.split(batch)
        x_t, y_t = self.unpack(target)
        s_t = self.logits(student, x_t)
        t_t = self.teacher_logits(x_t)
        check_classes("CrossDomain", s_t, t_t)
        loss = self.losses.kd_loss(s_t, t_t, temperature=self.temperature)
        parts = {"target_kd": loss.detach()}
        if source is not None and self.source_weight > 0:
            x_s, y_s = self.unpack(source)
            s_s = self.logits(student, x_s)
            src, src_parts = _source_loss(self, s_s, self.teacher_logits(x_s), y_s, self.temperature,
                                          self.alpha)
            loss = loss + self.source_weight * src
            parts.update(src_parts)
        return StepOutput(loss, s_t, y_t, parts)

    def extra_repr(self) -> str:
        return (f"temperature={self.temperature}, source_weight={self.source_weight}, alpha={self.alpha}, "
                f"{super().extra_repr()}")
