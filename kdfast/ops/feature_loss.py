"""Fake kernels and autograd for the ``kdfast::feature_loss_*`` ops.

``feature_loss_fused`` computes the reduced loss, O(rows) row statistics
(``||s||^2, ||t||^2, s.t`` per row where the kind needs them, zeros otherwise) and, for
the inputs flagged, the gradient of the loss in the same call, already times the
reduction's weight. Its backward scales the kept gradient (``kdfast.ops._kept``) or,
for a gradient the forward did not compute (float16), recomputes it with
``feature_loss_backward`` from the inputs and the statistics.
"""

from __future__ import annotations

import math

import torch

from kdfast._args import FEATURE_KINDS, feature_mean_divisor
from kdfast.ops import _kept

_STATS_COLS = 3
_REDUCTION_MEAN = 0
_REDUCTION_NONE = 2


def _check_shapes(student, teacher):
    torch._check(student.shape == teacher.shape,
                 lambda: "feature_loss: student and teacher must have the same shape")
    torch._check(student.dim() >= 1, lambda: "feature_loss: student must have shape [..., D]")


@torch.library.register_fake("kdfast::feature_loss_fused")
def _feature_loss_fused_fake(student, teacher, mask, kind, normalize, reduction,
                             student_requires_grad, teacher_requires_grad):
    _check_shapes(student, teacher)
    rows = math.prod(student.shape[:-1])
    acc = _kept.acc_dtype(student)
    shape = student.shape[:-1] if reduction == _REDUCTION_NONE else ()
    loss = student.new_empty(shape, dtype=acc)
    stats = student.new_empty((rows, _STATS_COLS), dtype=acc)
    return (loss, stats, _kept.empty_or_like(student, student_requires_grad),
            _kept.empty_or_like(teacher, teacher_requires_grad))


@torch.library.register_fake("kdfast::feature_loss_backward")
def _feature_loss_backward_fake(grad_loss, student, teacher, mask, stats, kind, normalize,
                                student_requires_grad, teacher_requires_grad):
    _check_shapes(student, teacher)
    return (_kept.empty_or_like(student, student_requires_grad),
            _kept.empty_or_like(teacher, teacher_requires_grad))


def _setup_context(ctx, inputs, output):
    (student, teacher, mask, kind, normalize, reduction, student_requires_grad,
     teacher_requires_grad) = inputs
    _loss, stats, grad_s, grad_t = output
    ctx.mark_non_differentiable(stats, grad_s, grad_t)
    _kept.keep(ctx, grad_s, grad_t, student_requires_grad, teacher_requires_grad)
    ctx.options = (kind, normalize, reduction)
    if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
        ctx.save_for_backward(student, teacher, mask, stats)


def _row_weights(grad_loss: torch.Tensor, mask, shape, kind: int, reduction: int) -> torch.Tensor:
    """The gradient reaching each row's loss, for the recomputing backward."""
    if reduction == _REDUCTION_NONE:
        return grad_loss
    if reduction == _REDUCTION_MEAN:
        grad_loss = grad_loss / feature_mean_divisor(mask, math.prod(shape[:-1]), shape[-1],
                                                     FEATURE_KINDS[kind])
    return grad_loss.expand(shape[:-1])


def _backward(ctx, grad_loss, _grad_stats, _grad_s, _grad_t):
    need_s, need_t = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    nones = (None,) * 6
    if grad_loss is None:  # the loss did not reach the output
        return (None, None, *nones)
    kind, normalize, reduction = ctx.options
    kept = _kept.kept_gradients(ctx, grad_loss, need_s, need_t, reduction == _REDUCTION_NONE)
    if kept is not None:
        return (*kept, *nones)
    student, teacher, mask, stats = ctx.saved_tensors
    weights = _row_weights(grad_loss.to(stats.dtype), mask, student.shape, kind, reduction)
    grad_s, grad_t = torch.ops.kdfast.feature_loss_backward(
        weights, student, teacher, mask, stats, kind, normalize, need_s, need_t)
    return (grad_s if need_s else None, grad_t if need_t else None, *nones)


torch.library.register_autograd("kdfast::feature_loss_fused", _backward,
                                setup_context=_setup_context)
