"""Fake kernels and autograd for ``kdfast::kd_loss_forward`` / ``kd_loss_backward``.

The forward op returns the per-row loss and O(N) row statistics; the backward op
recomputes the gradients from them in one pass (see ``docs/kd_loss_math.md``).
"""

from __future__ import annotations

import math

import torch

_STATS_COLS = 7


def _acc_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


@torch.library.register_fake("kdfast::kd_loss_forward")
def _kd_loss_forward_fake(student, teacher, labels, temperature, alpha, divergence, beta,
                          ignore_index):
    torch._check(student.shape == teacher.shape,
                 lambda: "kd_loss: student_logits and teacher_logits must have the same shape")
    torch._check(student.dim() >= 1, lambda: "kd_loss: student_logits must have shape [..., V]")
    rows = math.prod(student.shape[:-1])
    acc = _acc_dtype(student)
    loss = student.new_empty(student.shape[:-1], dtype=acc)
    stats = student.new_empty((rows, _STATS_COLS), dtype=acc)
    return loss, stats


@torch.library.register_fake("kdfast::kd_loss_backward")
def _kd_loss_backward_fake(grad_loss, student, teacher, labels, stats, temperature, alpha,
                           divergence, beta, ignore_index, student_requires_grad,
                           teacher_requires_grad):
    torch._check(student.shape == teacher.shape,
                 lambda: "kd_loss: student_logits and teacher_logits must have the same shape")
    grad_s = (torch.empty_like(student, memory_format=torch.contiguous_format)
              if student_requires_grad else student.new_empty(0))
    grad_t = (torch.empty_like(teacher, memory_format=torch.contiguous_format)
              if teacher_requires_grad else teacher.new_empty(0))
    return grad_s, grad_t


def _setup_context(ctx, inputs, output):
    student, teacher, labels, temperature, alpha, divergence, beta, ignore_index = inputs
    _, stats = output
    ctx.mark_non_differentiable(stats)
    ctx.options = (temperature, alpha, divergence, beta, ignore_index)
    if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
        ctx.save_for_backward(student, teacher, labels, stats)


def _backward(ctx, grad_loss, _grad_stats):
    student, teacher, labels, stats = ctx.saved_tensors
    need_s, need_t = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    if grad_loss is None:  # the loss did not reach the output
        return None, None, None, None, None, None, None, None
    grad_s, grad_t = torch.ops.kdfast.kd_loss_backward(
        grad_loss.to(stats.dtype), student, teacher, labels, stats, *ctx.options, need_s, need_t)
    return (grad_s if need_s else None, grad_t if need_t else None,
            None, None, None, None, None, None)


torch.library.register_autograd("kdfast::kd_loss_forward", _backward,
                                setup_context=_setup_context)
