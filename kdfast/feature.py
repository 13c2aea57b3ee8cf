"""Feature-matching distillation losses: :func:`feature_loss` and :class:`FeatureLoss`."""

from __future__ import annotations

import torch
from torch import nn

from kdfast import _extension, reference
from kdfast._args import FEATURE_KINDS, FEATURE_REDUCTIONS, check_feature_options, check_feature_tensors
from kdfast.ops._kept import gradient_in_forward

__all__ = ["FEATURE_KINDS", "FEATURE_REDUCTIONS", "FeatureLoss", "feature_loss"]


def feature_loss(student: torch.Tensor, teacher: torch.Tensor, *, kind: str = "mse",
                 normalize: bool = False, mask: torch.Tensor | None = None,
                 reduction: str = "mean") -> torch.Tensor:
    r"""Feature-matching loss between student and teacher features, fused (one op).

    Each row (every position of the leading dimensions) is a pair of feature vectors
    ``s, t`` of the last dimension ``D``. With ``normalize=True`` both become
    ``x / max(||x||_2, 1e-12)`` first (exactly ``F.normalize(x, dim=-1)``), with the
    gradient through the normalisation; call the (normalised) vectors ``u, v``. Per row::

        "mse"        sum_d (u_d - v_d)**2
        "l1"         sum_d |u_d - v_d|
        "smooth_l1"  sum_d h(u_d - v_d),  h(x) = 0.5 x**2 if |x| < 1 else |x| - 0.5  (beta 1)
        "cosine"     1 - (u / max(||u||, 1e-8)) . (v / max(||v||, 1e-8))

    ``"cosine"`` is the forward of ``1 - F.cosine_similarity(u, v, dim=-1)``; its gradient
    is the exact derivative of the formula above, which equals torch's wherever
    ``||x|| >= 1e-8`` and at exactly-zero vectors. A zero vector has cosine loss 1 and a
    large (finite) gradient, as in torch (with ``normalize=True`` about ``1e20``): mask
    such rows. All math is in float32 whatever the input dtype (float64 for float64).

    When autograd will need a gradient, it is computed in the same call as the loss,
    already times the reduction's weight, and kept until the backward, which only scales
    it by the incoming gradient (in place, no work when that is 1): each input is read
    from memory once, each gradient written once. For ``"cosine"`` (with or without
    ``normalize``) and ``"mse"`` with ``normalize`` the gradient is ``a*s + b*t`` with
    per-row scalars from one pass over the row; the other kinds need one pass (``l1`` /
    ``smooth_l1`` with ``normalize``: three, two of them over the cache-resident row).
    float16 gradients are computed in the backward instead, where a loss scale is known.
    Memory kept between forward and backward: the gradient (like the input it belongs
    to) and three numbers per row (the inputs are referenced too, for a gradient
    recomputed in the backward). With ``retain_graph=True`` each backward returns a
    scaled copy of the kept gradient.

    Args:
        student: ``[..., D]`` float32 / float16 / bfloat16 (float64 for testing), any
            strides. Receives the gradient.
        teacher: ``[..., D]``, same shape; its dtype may differ from the student's (both
            float64 or neither). Receives a gradient too when it requires grad.
        kind: ``"mse"``, ``"l1"``, ``"smooth_l1"`` or ``"cosine"``.
        normalize: L2-normalise both vectors of each row first.
        mask: bool ``[...]`` (the leading shape), on the device of ``student``: rows that
            are ``False`` contribute 0 and get zero gradients. ``None``: every row.
        reduction: ``"mean"`` (element-wise kinds: the sum over selected rows and ``D``
            divided by ``selected rows * D``; ``"cosine"``: divided by the selected rows;
            0 with zero gradients when no row is selected), ``"sum"``, or ``"none"``
            (shape ``[...]``: each row's loss, for element-wise kinds the sum over ``D``,
            so ``none.sum() == sum``; 0 on unselected rows).

    Returns:
        float32 tensor (float64 for float64 inputs): 0-dim, or ``[...]`` for ``"none"``.

    Example::

        >>> import torch, kdfast
        >>> student = torch.randn(8, 196, 768, requires_grad=True)   # e.g. ViT tokens
        >>> teacher = torch.randn(8, 196, 768)
        >>> keep = torch.rand(8, 196) > 0.1                          # rows to match
        >>> loss = kdfast.feature_loss(student, teacher, kind="cosine", normalize=True, mask=keep)
        >>> loss.backward()
    """
    kind_code, red_code = check_feature_options(kind, normalize, reduction)
    check_feature_tensors(student, teacher, mask)
    if _extension.has_kernel_cached("feature_loss_fused", student.device.type):
        loss, _, _, _ = torch.ops.kdfast.feature_loss_fused(
            student, teacher, mask, kind_code, normalize, red_code, gradient_in_forward(student),
            gradient_in_forward(teacher))
        return loss
    _extension.warn_fallback(student.device.type)
    return reference.feature_loss(student, teacher, kind=kind, normalize=normalize, mask=mask,
                                  reduction=reduction)


class FeatureLoss(nn.Module):
    """Module form of :func:`kdfast.feature_loss`; the options are fixed at construction.

    Shapes: ``student``, ``teacher`` ``[..., D]``; ``mask`` bool ``[...]`` or None.

    Example::

        >>> crit = kdfast.FeatureLoss(kind="smooth_l1", normalize=True)
        >>> loss = crit(student_features, teacher_features)
        >>> loss = crit(student_features, teacher_features, mask=attention_mask.bool())
    """

    def __init__(self, kind: str = "mse", normalize: bool = False, reduction: str = "mean") -> None:
        super().__init__()
        check_feature_options(kind, normalize, reduction)
        self.kind = kind
        self.normalize = normalize
        self.reduction = reduction

    def forward(self, student: torch.Tensor, teacher: torch.Tensor,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        return feature_loss(student, teacher, kind=self.kind, normalize=self.normalize, mask=mask,
                            reduction=self.reduction)

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}, normalize={self.normalize}, reduction={self.reduction!r}"
