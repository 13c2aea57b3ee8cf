"""Fake kernels and autograd for the ``kdfast::dkd_loss_*`` ops.

``dkd_loss_fused`` computes the reduced loss, O(rows) row statistics and, for the inputs
flagged, the gradient of the loss in the same pass over the logits. Its backward scales
the kept gradient (``kdfast.ops._kept``) or, for a gradient the forward did not compute
(float16), recomputes it with ``dkd_loss_backward`` from the row statistics.
"""

from __future__ import annotations

import math

import torch

from kdfast._args import batchmean_count
from kdfast.ops import _kept

STATS_COLS = 8
_REDUCTION_BATCHMEAN = 0
_REDUCTION_NONE = 2


def _check_shapes(student, teacher, labels) -> None:
    torch._check(student.dim() >= 1, lambda: "dkd_loss: student_logits must have shape [..., V]")
    torch._check(student.shape == teacher.shape,
                 lambda: "dkd_loss: student_logits and teacher_logits must have the same shape")
    torch._check(labels.shape == student.shape[:-1],
                 lambda: "dkd_loss: labels must have the leading shape of student_logits")


@torch.library.register_fake("kdfast::dkd_loss_fused")
def _dkd_loss_fused_fake(student, teacher, labels, alpha, beta, temperature, ignore_index,
                         reduction, student_requires_grad, teacher_requires_grad):
    _check_shapes(student, teacher, labels)
    rows = math.prod(student.shape[:-1])
    acc = _kept.acc_dtype(student)
    shape = student.shape[:-1] if reduction == _REDUCTION_NONE else ()
    loss = student.new_empty(shape, dtype=acc)
    stats = student.new_empty((rows, STATS_COLS), dtype=acc)
    return (loss, stats, _kept.empty_or_like(student, student_requires_grad),
            _kept.empty_or_like(teacher, teacher_requires_grad))


@torch.library.register_fake("kdfast::dkd_loss_backward")
def _dkd_loss_backward_fake(grad_loss, student, teacher, labels, stats, alpha, beta, temperature,
                            ignore_index, student_requires_grad, teacher_requires_grad):
    _check_shapes(student, teacher, labels)
    return (_kept.empty_or_like(student, student_requires_grad),
            _kept.empty_or_like(teacher, teacher_requires_grad))


def _setup_context(ctx, inputs, output):
    (student, teacher, labels, alpha, beta, temperature, ignore_index, reduction,
     student_requires_grad, teacher_requires_grad) = inputs
    _loss, stats, grad_s, grad_t = output
    ctx.mark_non_differentiable(stats, grad_s, grad_t)
    _kept.keep(ctx, grad_s, grad_t, student_requires_grad, teacher_requires_grad)
    ctx.options = (alpha, beta, temperature, ignore_index)
    ctx.reduction = reduction
    if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
        ctx.save_for_backward(student, teacher, labels, stats)


def _row_weights(grad_loss: torch.Tensor, labels: torch.Tensor, ignore_index: int,
                 reduction: int) -> torch.Tensor:
    """The gradient reaching each row's loss, for the recomputing backward."""
    if reduction == _REDUCTION_NONE:
        return grad_loss
    if reduction == _REDUCTION_BATCHMEAN:
        grad_loss = grad_loss / batchmean_count(labels, labels.numel(), ignore_index)
    return grad_loss.expand(labels.shape)


def _backward(ctx, grad_loss, _grad_stats, _grad_s, _grad_t):
    need_s, need_t = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    nones = (None,) * 8
    if grad_loss is None:  # the loss did not reach the output
        return (None, None, *nones)
    kept = _kept.kept_gradients(ctx, grad_loss, need_s, need_t, ctx.reduction == _REDUCTION_NONE)
    if kept is not None:
        return (*kept, *nones)
    student, teacher, labels, stats = ctx.saved_tensors
    alpha, beta, temperature, ignore_index = ctx.options
    weights = _row_weights(grad_loss.to(stats.dtype), labels, ignore_index, ctx.reduction)
    grad_s, grad_t = torch.ops.kdfast.dkd_loss_backward(
        weights, student, teacher, labels, stats, alpha, beta, temperature, ignore_index,
        need_s, need_t)
    return (grad_s if need_s else None, grad_t if need_t else None, *nones)


torch.library.register_autograd("kdfast::dkd_loss_fused", _backward,
                                setup_context=_setup_context)
