"""Fake kernels and autograd for the ``kdfast::kd_loss_*`` ops.

``kd_loss_fused`` computes the reduced loss, O(rows) row statistics and, for the
inputs flagged, the gradient of the loss in the same pass over the logits. Its
backward scales the kept gradient (``kdfast.ops._kept``) or, for a gradient the forward
did not compute, recomputes it with ``kd_loss_backward`` from the row statistics (see
``docs/kd_loss_math.md``, "Which path runs when").
"""

from __future__ import annotations

import math

import torch

from kdfast._args import batchmean_count
from kdfast.ops import _kept

_STATS_COLS = 7
_REDUCTION_NONE = 2


@torch.library.register_fake("kdfast::kd_loss_fused")
def _kd_loss_fused_fake(student, teacher, labels, temperature, alpha, divergence, beta,
                        ignore_index, softcap, reduction, student_requires_grad,
                        teacher_requires_grad):
    torch._check(student.shape == teacher.shape,
                 lambda: "kd_loss: student_logits and teacher_logits must have the same shape")
    torch._check(student.dim() >= 1, lambda: "kd_loss: student_logits must have shape [..., V]")
    rows = math.prod(student.shape[:-1])
    acc = _kept.acc_dtype(student)
    shape = student.shape[:-1] if reduction == _REDUCTION_NONE else ()
    loss = student.new_empty(shape, dtype=acc)
    stats = student.new_empty((rows, _STATS_COLS), dtype=acc)
    return (loss, stats, _kept.empty_or_like(student, student_requires_grad),
            _kept.empty_or_like(teacher, teacher_requires_grad))


@torch.library.register_fake("kdfast::kd_loss_backward")
def _kd_loss_backward_fake(grad_loss, student, teacher, labels, stats, temperature, alpha,
                           divergence, beta, ignore_index, softcap, student_requires_grad,
                           teacher_requires_grad):
    torch._check(student.shape == teacher.shape,
                 lambda: "kd_loss: student_logits and teacher_logits must have the same shape")
    return (_kept.empty_or_like(student, student_requires_grad),
            _kept.empty_or_like(teacher, teacher_requires_grad))


@torch.library.register_fake("kdfast::kd_loss_scale_grad_")
def _kd_loss_scale_grad_fake(grad, scale):
    return None


def _setup_context(ctx, inputs, output):
    (student, teacher, labels, temperature, alpha, divergence, beta, ignore_index, softcap,
     reduction, student_requires_grad, teacher_requires_grad) = inputs
    _loss, stats, grad_s, grad_t = output
    ctx.mark_non_differentiable(stats, grad_s, grad_t)
    _kept.keep(ctx, grad_s, grad_t, student_requires_grad, teacher_requires_grad)
    ctx.options = (temperature, alpha, divergence, beta, ignore_index, softcap)
    ctx.reduction = reduction
    if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
        ctx.save_for_backward(student, teacher, labels, stats)


def _row_weights(grad_loss: torch.Tensor, labels, rows_shape, ignore_index: int,
                 reduction: int) -> torch.Tensor:
    """The gradient reaching each row's loss, for the recomputing backward."""
    if reduction == _REDUCTION_NONE:
        return grad_loss
    if reduction == 0:  # batchmean
        grad_loss = grad_loss / batchmean_count(labels, math.prod(rows_shape), ignore_index)
    return grad_loss.expand(rows_shape)


def _backward(ctx, grad_loss, _grad_stats, _grad_s, _grad_t):
    need_s, need_t = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    nones = (None,) * 10
    if grad_loss is None:  # the loss did not reach the output
        return (None, None, *nones)
    kept = _kept.kept_gradients(ctx, grad_loss, need_s, need_t, ctx.reduction == _REDUCTION_NONE)
    if kept is not None:
        return (*kept, *nones)
    student, teacher, labels, stats = ctx.saved_tensors
    temperature, alpha, divergence, beta, ignore_index, softcap = ctx.options
    weights = _row_weights(grad_loss.to(stats.dtype), labels, student.shape[:-1], ignore_index,
                           ctx.reduction)
    grad_s, grad_t = torch.ops.kdfast.kd_loss_backward(
        weights, student, teacher, labels, stats, temperature, alpha, divergence, beta,
        ignore_index, softcap, need_s, need_t)
    return (grad_s if need_s else None, grad_t if need_t else None, *nones)


torch.library.register_autograd("kdfast::kd_loss_fused", _backward, setup_context=_setup_context)
