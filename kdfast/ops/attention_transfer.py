"""Fake kernels and autograd for the ``kdfast::attention_transfer_*`` ops.

``attention_transfer_fused`` computes the loss of one pair of feature maps, O(N)
per-sample statistics and, for the inputs flagged, the gradient of the loss in the same
pass over the inputs (the 1 / (N H W) of the mean included). Its backward scales the
kept gradient (``kdfast.ops._kept``) or, for a gradient the forward did not compute
(float16), recomputes it with ``attention_transfer_backward`` from the statistics.
"""

from __future__ import annotations

import torch

from kdfast.ops import _kept

STATS_COLS = 5  # ||A_s||, ||A_t||, <a_s, a_s - a_t>, <a_t, a_s - a_t>, ||a_s - a_t||^2


def gradient_is_channels_last(x: torch.Tensor) -> bool:
    """Whether the kernels give ``x`` a channels_last gradient: for channels_last inputs
    (read in place); every other input gets a contiguous gradient."""
    return x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


def _gradient_like(x: torch.Tensor, wanted: bool) -> torch.Tensor:
    if not wanted:
        return x.new_empty(0)
    fmt = torch.channels_last if gradient_is_channels_last(x) else torch.contiguous_format
    return torch.empty_like(x, memory_format=fmt)


def _check_shapes(student: torch.Tensor, teacher: torch.Tensor) -> None:
    torch._check(student.dim() == 4 and teacher.dim() == 4,
                 lambda: "attention_transfer_loss: student_feat and teacher_feat must be 4-D")
    torch._check(student.shape[0] == teacher.shape[0] and student.shape[2:] == teacher.shape[2:],
                 lambda: "attention_transfer_loss: student_feat and teacher_feat must have the "
                         "same N, H and W")


@torch.library.register_fake("kdfast::attention_transfer_fused")
def _attention_transfer_fused_fake(student, teacher, p, student_requires_grad,
                                   teacher_requires_grad):
    _check_shapes(student, teacher)
    acc = _kept.acc_dtype(student)
    loss = student.new_empty((), dtype=acc)
    stats = student.new_empty((student.shape[0], STATS_COLS), dtype=acc)
    return (loss, stats, _gradient_like(student, student_requires_grad),
            _gradient_like(teacher, teacher_requires_grad))


@torch.library.register_fake("kdfast::attention_transfer_backward")
def _attention_transfer_backward_fake(grad_loss, student, teacher, stats, p,
                                      student_requires_grad, teacher_requires_grad):
    _check_shapes(student, teacher)
    return (_gradient_like(student, student_requires_grad),
            _gradient_like(teacher, teacher_requires_grad))


def _setup_context(ctx, inputs, output):
    student, teacher, p, student_requires_grad, teacher_requires_grad = inputs
    _loss, stats, grad_s, grad_t = output
    ctx.mark_non_differentiable(stats, grad_s, grad_t)
    _kept.keep(ctx, grad_s, grad_t, student_requires_grad, teacher_requires_grad)
    ctx.p = p
    if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
        ctx.save_for_backward(student, teacher, stats)


def _backward(ctx, grad_loss, _stats, _grad_s, _grad_t):
    need_s, need_t = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    nones = (None,) * 3
    if grad_loss is None:  # the loss did not reach the output
        return (None, None, *nones)
    kept = _kept.kept_gradients(ctx, grad_loss, need_s, need_t, per_row=False)
    if kept is not None:
        return (*kept, *nones)
    student, teacher, stats = ctx.saved_tensors
    grad_s, grad_t = torch.ops.kdfast.attention_transfer_backward(
        grad_loss.to(stats.dtype), student, teacher, stats, ctx.p, need_s, need_t)
    return (grad_s if need_s else None, grad_t if need_t else None, *nones)


torch.library.register_autograd("kdfast::attention_transfer_fused", _backward,
                                setup_context=_setup_context)
