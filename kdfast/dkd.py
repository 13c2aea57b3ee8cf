"""Decoupled Knowledge Distillation (DKD, Zhao et al., CVPR 2022) as one fused op:
:func:`dkd_loss` and its module form :class:`DKDLoss`."""

from __future__ import annotations

import math

import torch
from torch import nn

from kdfast import _extension, reference
from kdfast._args import FLOAT_DTYPES, REDUCTIONS
from kdfast.ops._kept import gradient_in_forward

__all__ = ["DKDLoss", "check_dkd_options", "check_dkd_tensors", "dkd_loss"]

_INT_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


def _check_real(name: str, value, *, positive: bool) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"dkd_loss: {name} must be a float, got {type(value).__name__}")
    if positive:
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"dkd_loss: {name} must be finite and > 0, got {value}")
    elif not (math.isfinite(value) and value >= 0):
        raise ValueError(f"dkd_loss: {name} must be finite and >= 0, got {value}")


def check_dkd_options(alpha: float, beta: float, temperature: float, ignore_index: int,
                      reduction: str) -> None:
    """Validates the scalar options of :func:`dkd_loss` (raises naming the argument)."""
    _check_real("alpha", alpha, positive=False)
    _check_real("beta", beta, positive=False)
    _check_real("temperature", temperature, positive=True)
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"dkd_loss: ignore_index must be an int, got {type(ignore_index).__name__}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"dkd_loss: reduction must be one of {REDUCTIONS}, got {reduction!r}")


def check_dkd_tensors(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                      labels: torch.Tensor) -> torch.Tensor:
    """Validates the tensors of :func:`dkd_loss` (shapes, dtypes, devices); returns the
    labels as int64. Label values are checked by the op (CPU: an error; CUDA: a
    device-side assertion, no synchronisation)."""
    for name, x in (("student_logits", student_logits), ("teacher_logits", teacher_logits)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"dkd_loss: {name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dtype not in FLOAT_DTYPES:
            raise TypeError(f"dkd_loss: {name} must be float32, float16 or bfloat16 "
                            f"(float64 for testing), got {x.dtype}")
        if x.dim() < 1:
            raise ValueError(f"dkd_loss: {name} must have shape [..., V], got a 0-dim tensor")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError("dkd_loss: student_logits and teacher_logits must have the same shape, "
                         f"got {tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}")
    if student_logits.shape[-1] < 2:
        raise ValueError("dkd_loss: student_logits must have a vocabulary (last) dimension >= 2 "
                         "(a target and at least one non-target class), got "
                         f"{student_logits.shape[-1]}")
    if (student_logits.dtype == torch.float64) != (teacher_logits.dtype == torch.float64):
        raise TypeError("dkd_loss: float64 student_logits and teacher_logits must both be "
                        f"float64, got {student_logits.dtype} and {teacher_logits.dtype}")
    if student_logits.device != teacher_logits.device:
        raise ValueError("dkd_loss: student_logits and teacher_logits must be on the same "
                         f"device, got {student_logits.device} and {teacher_logits.device}")
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"dkd_loss: labels must be a torch.Tensor, got {type(labels).__name__}")
    if labels.dtype not in _INT_DTYPES:
        raise TypeError(f"dkd_loss: labels must be an integer tensor (int64), got {labels.dtype}")
    if labels.shape != student_logits.shape[:-1]:
        raise ValueError("dkd_loss: labels must have the leading shape of student_logits "
                         f"{tuple(student_logits.shape[:-1])}, got {tuple(labels.shape)}")
    if labels.device != student_logits.device:
        raise ValueError(f"dkd_loss: labels must be on {student_logits.device}, got {labels.device}")
    return labels.long()


def dkd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor, *,
             alpha: float = 1.0, beta: float = 8.0, temperature: float = 4.0,
             ignore_index: int = -100, reduction: str = "batchmean") -> torch.Tensor:
    r"""Decoupled Knowledge Distillation loss (Zhao et al., CVPR 2022), fused.

    Per row ``i`` (every position of the leading dimensions) with target ``y = labels_i``,
    ``p = softmax(teacher_logits_i / T)`` and ``q = softmax(student_logits_i / T)``:

    - TCKD, target-class KD: ``KL(b_t || b_s)`` between the binary distributions
      ``b = (p_y, 1 - p_y)`` of the teacher and ``(q_y, 1 - q_y)`` of the student;
    - NCKD, non-target-class KD: ``KL(p~ || q~)`` between the softmaxes over the
      non-target classes only (the target is left out exactly; no large offset on
      its logit);
    - ``loss_i = T**2 * (alpha * TCKD + beta * NCKD)``.

    ``1 - p_y`` is never formed by subtraction: both parts come from the non-target
    maximum and sum of each row, so a teacher that is certain of its target
    (``p_y -> 1``) still gets an exact non-target distribution, and every exponential
    is safe where denormals flush to zero. All math is float32 (float64 for float64
    inputs) whatever the input dtype.

    One pass over the logits computes the loss and, when autograd will need it, the
    gradient of each input that requires grad (student always; teacher too for online /
    mutual distillation). The backward only scales that kept gradient by the incoming
    gradient (in place; nothing to do at 1). float16 gradients are recomputed in the
    backward instead, where a loss scale is known (kept at scale 1 they would
    underflow). Memory kept between forward and backward: the gradient of each input
    that requires grad (like that input), 8 floats per row of statistics and
    references to the inputs; nothing ``[N, V]``-sized beyond that. Under
    ``torch.no_grad()`` only the loss is computed.

    Args:
        student_logits: ``[..., V]`` float32 / float16 / bfloat16 (float64 for
            testing), ``V >= 2``, any strides. Receives the gradient.
        teacher_logits: ``[..., V]``, same shape; its dtype may differ from the
            student's. Receives a gradient too when it requires grad.
        labels: ``[...]`` integer target classes in ``[0, V)``. Rows whose label
            equals ``ignore_index`` contribute nothing and are not counted. A label out
            of range is an error (CPU) or a device-side assertion (CUDA).
        alpha: weight of TCKD, ``>= 0``.
        beta: weight of NCKD, ``>= 0``.
        temperature: softening temperature ``T > 0``; both parts are scaled by ``T**2``.
        ignore_index: label value of rows to skip.
        reduction: ``"batchmean"`` (sum over counted rows / their number, 0 when none),
            ``"sum"``, or ``"none"`` (shape ``[...]``, zeros on ignored rows).

    Returns:
        float32 tensor (float64 for float64 inputs): 0-dim, or ``[...]`` for ``"none"``.
        A row holding NaN, or +inf, or whose non-target classes are all ``-inf`` in
        an input, has a NaN loss and NaN gradients. ``-inf`` logits are masked classes
        (zero probability); a class that the student masks but the teacher does not
        gives an infinite loss.

    Example::

        >>> import torch, kdfast
        >>> student = torch.randn(32, 100, requires_grad=True)
        >>> teacher = torch.randn(32, 100)
        >>> labels = torch.randint(0, 100, (32,))
        >>> loss = kdfast.dkd_loss(student, teacher, labels, alpha=1.0, beta=8.0, temperature=4.0)
        >>> loss.backward()
    """
    check_dkd_options(alpha, beta, temperature, ignore_index, reduction)
    labels = check_dkd_tensors(student_logits, teacher_logits, labels)
    if _extension.has_kernel_cached("dkd_loss_fused", student_logits.device.type):
        loss, _, _, _ = torch.ops.kdfast.dkd_loss_fused(
            student_logits, teacher_logits, labels, float(alpha), float(beta), float(temperature),
            ignore_index, REDUCTIONS.index(reduction), gradient_in_forward(student_logits),
            gradient_in_forward(teacher_logits))
        return loss
    _extension.warn_fallback(student_logits.device.type)
    return reference.dkd_loss(student_logits, teacher_logits, labels, alpha=alpha, beta=beta,
                              temperature=temperature, ignore_index=ignore_index,
                              reduction=reduction)


class DKDLoss(nn.Module):
    """Module form of :func:`kdfast.dkd_loss`; the options are fixed at construction.

    Shapes: ``student_logits``, ``teacher_logits`` ``[..., V]``; ``labels`` ``[...]``.

    Example::

        >>> crit = kdfast.DKDLoss(alpha=1.0, beta=8.0, temperature=4.0)
        >>> loss = crit(student_logits, teacher_logits, labels)
    """

    def __init__(self, alpha: float = 1.0, beta: float = 8.0, temperature: float = 4.0,
                 ignore_index: int = -100, reduction: str = "batchmean") -> None:
        super().__init__()
        check_dkd_options(alpha, beta, temperature, ignore_index, reduction)
        self.alpha = alpha
        self.beta = beta
        self.temperature = temperature
        self.ignore_index = ignore_index
        self.reduction = reduction

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                labels: torch.Tensor) -> torch.Tensor:
        return dkd_loss(student_logits, teacher_logits, labels, alpha=self.alpha, beta=self.beta,
                        temperature=self.temperature, ignore_index=self.ignore_index,
                        reduction=self.reduction)

    def extra_repr(self) -> str:
        return (f"alpha={self.alpha}, beta={self.beta}, temperature={self.temperature}, "
                f"ignore_index={self.ignore_index}, reduction={self.reduction!r}")
