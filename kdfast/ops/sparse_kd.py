"""Fake kernels and autograd for the ``kdfast::sparse_kd_loss_*`` ops.

``sparse_kd_loss_fused`` computes the reduced loss, O(rows) row statistics and, when
flagged, the student's gradient in the same pass over the student logits (the teacher,
given sparsely as indices and values, gets no gradient). Its backward scales the kept
gradient (``kdfast.ops._kept``) or, when the forward did not compute it (float16),
recomputes it with ``sparse_kd_loss_backward`` from the row statistics.
"""

from __future__ import annotations

import math

import torch

from kdfast._args import batchmean_count
from kdfast.ops import _kept

STATS_COLS = 7
_REDUCTION_BATCHMEAN = 0
_REDUCTION_NONE = 2


def _check_shapes(student, teacher_indices, teacher_values) -> None:
    torch._check(student.dim() >= 1, lambda: "sparse_kd_loss: student_logits must have shape [..., V]")
    torch._check(teacher_indices.shape == teacher_values.shape,
                 lambda: "sparse_kd_loss: teacher_indices and teacher_values must have the same shape")
    torch._check(teacher_indices.dim() == student.dim()
                 and teacher_indices.shape[:-1] == student.shape[:-1],
                 lambda: "sparse_kd_loss: teacher_indices must have shape [..., K] with the leading "
                         "shape of student_logits")


@torch.library.register_fake("kdfast::sparse_kd_loss_fused")
def _sparse_kd_loss_fused_fake(student, teacher_indices, teacher_values, labels, temperature, alpha,
                               logprobs, tail, ignore_index, reduction, student_requires_grad):
    _check_shapes(student, teacher_indices, teacher_values)
    rows = math.prod(student.shape[:-1])
    acc = _kept.acc_dtype(student)
    shape = student.shape[:-1] if reduction == _REDUCTION_NONE else ()
    loss = student.new_empty(shape, dtype=acc)
    stats = student.new_empty((rows, STATS_COLS), dtype=acc)
    return loss, stats, _kept.empty_or_like(student, student_requires_grad)


@torch.library.register_fake("kdfast::sparse_kd_loss_backward")
def _sparse_kd_loss_backward_fake(grad_loss, student, teacher_indices, teacher_values, labels, stats,
                                  temperature, alpha, logprobs, tail, ignore_index):
    _check_shapes(student, teacher_indices, teacher_values)
    return _kept.empty_or_like(student, True)


def _setup_context(ctx, inputs, output):
    (student, teacher_indices, teacher_values, labels, temperature, alpha, logprobs, tail,
     ignore_index, reduction, student_requires_grad) = inputs
    _loss, stats, grad_s = output
    ctx.mark_non_differentiable(stats, grad_s)
    _kept.keep(ctx, grad_s, None, student_requires_grad, False)
    ctx.options = (temperature, alpha, logprobs, tail, ignore_index)
    ctx.reduction = reduction
    if ctx.needs_input_grad[0]:
        ctx.save_for_backward(student, teacher_indices, teacher_values, labels, stats)


def _row_weights(grad_loss: torch.Tensor, labels, rows_shape, ignore_index: int,
                 reduction: int) -> torch.Tensor:
    """The gradient reaching each row's loss, for the recomputing backward."""
    if reduction == _REDUCTION_NONE:
        return grad_loss
    if reduction == _REDUCTION_BATCHMEAN:
        grad_loss = grad_loss / batchmean_count(labels, math.prod(rows_shape), ignore_index)
    return grad_loss.expand(rows_shape)


def _backward(ctx, grad_loss, _grad_stats, _grad_s):
    nones = (None,) * 10  # teacher_indices, teacher_values (no gradient) and the options
    if grad_loss is None or not ctx.needs_input_grad[0]:
        return (None, *nones)
    kept = _kept.kept_gradients(ctx, grad_loss, True, False, ctx.reduction == _REDUCTION_NONE)
    if kept is not None:
        return (kept[0], *nones)
    student, teacher_indices, teacher_values, labels, stats = ctx.saved_tensors
    temperature, alpha, logprobs, tail, ignore_index = ctx.options
    weights = _row_weights(grad_loss.to(stats.dtype), labels, student.shape[:-1], ignore_index,
                           ctx.reduction)
    grad_s = torch.ops.kdfast.sparse_kd_loss_backward(
        weights, student, teacher_indices, teacher_values, labels, stats, temperature, alpha,
        logprobs, tail, ignore_index)
    return (grad_s, *nones)


torch.library.register_autograd("kdfast::sparse_kd_loss_fused", _backward,
                                setup_context=_setup_context)
