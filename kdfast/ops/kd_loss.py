"""Fake kernels and autograd for the ``kdfast::kd_loss_*`` ops.

``kd_loss_fused`` computes the reduced loss, O(rows) row statistics and, for the
inputs flagged, the gradient of the loss in the same pass over the logits. Its
backward has two paths (see ``docs/kd_loss_math.md``, "Which path runs when"):

- **kept gradient** (a forward that computed the gradients): the kept gradient is
  scaled in place by the incoming gradient with ``kd_loss_scale_grad_``, which skips
  rows whose scale is exactly 1, and handed to autograd, which takes the buffer as
  ``.grad``: no second gradient-sized buffer and no pass over the logits. When the
  graph is kept for another backward (``retain_graph=True``, ``create_graph=True``)
  a scaled copy is returned instead, so every backward gives the same bits.
- **recompute** (a forward that computed no gradient for an input that needs one):
  ``kd_loss_backward`` recomputes the gradient from the inputs and the row
  statistics in one pass.

Under tracing (``torch.compile``, ``opcheck``'s AOT checks) the kept gradient is
scaled out of place, so the traced graph stays functional.
"""

from __future__ import annotations

import math

import torch

from kdfast._args import batchmean_count

_STATS_COLS = 7
_REDUCTION_NONE = 2


def _acc_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _empty_or_like(x: torch.Tensor, wanted: bool) -> torch.Tensor:
    if wanted:
        return torch.empty_like(x, memory_format=torch.contiguous_format)
    return x.new_empty(0)


@torch.library.register_fake("kdfast::kd_loss_fused")
def _kd_loss_fused_fake(student, teacher, labels, temperature, alpha, divergence, beta,
                        ignore_index, softcap, reduction, student_requires_grad,
                        teacher_requires_grad):
    torch._check(student.shape == teacher.shape,
                 lambda: "kd_loss: student_logits and teacher_logits must have the same shape")
    torch._check(student.dim() >= 1, lambda: "kd_loss: student_logits must have shape [..., V]")
    rows = math.prod(student.shape[:-1])
    acc = _acc_dtype(student)
    shape = student.shape[:-1] if reduction == _REDUCTION_NONE else ()
    loss = student.new_empty(shape, dtype=acc)
    stats = student.new_empty((rows, _STATS_COLS), dtype=acc)
    return (loss, stats, _empty_or_like(student, student_requires_grad),
            _empty_or_like(teacher, teacher_requires_grad))


@torch.library.register_fake("kdfast::kd_loss_backward")
def _kd_loss_backward_fake(grad_loss, student, teacher, labels, stats, temperature, alpha,
                           divergence, beta, ignore_index, softcap, student_requires_grad,
                           teacher_requires_grad):
    torch._check(student.shape == teacher.shape,
                 lambda: "kd_loss: student_logits and teacher_logits must have the same shape")
    return (_empty_or_like(student, student_requires_grad),
            _empty_or_like(teacher, teacher_requires_grad))


@torch.library.register_fake("kdfast::kd_loss_scale_grad_")
def _kd_loss_scale_grad_fake(grad, scale):
    return None


def _tracing(*tensors: torch.Tensor) -> bool:
    """True while the op is traced (fake / functional tensors, a dispatch mode, dynamo)
    rather than run: only then must the backward avoid its in-place scaling."""
    if torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack() > 0:
        return True
    return any(type(t) is not torch.Tensor for t in tensors)


def _setup_context(ctx, inputs, output):
    (student, teacher, labels, temperature, alpha, divergence, beta, ignore_index, softcap,
     reduction, student_requires_grad, teacher_requires_grad) = inputs
    _loss, stats, grad_s, grad_t = output
    ctx.mark_non_differentiable(stats, grad_s, grad_t)
    # No zero-filled stand-ins for the gradients of the non-differentiable outputs: for
    # grad_student / grad_teacher they would be gradient-sized.
    ctx.set_materialize_grads(False)
    ctx.options = (temperature, alpha, divergence, beta, ignore_index, softcap)
    ctx.reduction = reduction
    # The gradients computed in the forward pass. Held as attributes, not saved tensors:
    # the backward scales them in place and hands them to autograd, and drops its own
    # reference first so that autograd can take the buffer without a copy.
    ctx.kept = (grad_s if student_requires_grad else None,
                grad_t if teacher_requires_grad else None)
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


def _scaled(kept: torch.Tensor, grad_loss: torch.Tensor, reduction: int, traced: bool,
            keep: bool) -> torch.Tensor:
    """The kept gradient times the incoming one: in place when this backward is its last
    user, on a copy (same rounding) when the graph is kept for another backward."""
    if traced:
        scale = grad_loss.unsqueeze(-1) if reduction == _REDUCTION_NONE else grad_loss
        return (kept * scale).to(kept.dtype)
    out = kept.clone() if keep else kept
    torch.ops.kdfast.kd_loss_scale_grad_(out, grad_loss)
    return out


def _backward(ctx, grad_loss, _grad_stats, _grad_s, _grad_t):
    need_s, need_t = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    nones = (None,) * 10
    if grad_loss is None:  # the loss did not reach the output
        return (None, None, *nones)
    kept_s, kept_t = ctx.kept
    if (kept_s is not None or not need_s) and (kept_t is not None or not need_t):
        traced = _tracing(grad_loss, *(k for k in (kept_s, kept_t) if k is not None))
        # retain_graph=True (or create_graph): another backward may follow, so the kept
        # gradient stays as it is and this one gets a scaled copy.
        keep = not traced and torch._C._autograd._get_current_graph_task_keep_graph()
        if not keep:
            ctx.kept = (None, None)  # autograd may now take the buffer without a copy
        grad_s = _scaled(kept_s, grad_loss, ctx.reduction, traced, keep) if need_s else None
        grad_t = _scaled(kept_t, grad_loss, ctx.reduction, traced, keep) if need_t else None
        del kept_s, kept_t
        return (grad_s, grad_t, *nones)
    student, teacher, labels, stats = ctx.saved_tensors
    temperature, alpha, divergence, beta, ignore_index, softcap = ctx.options
    weights = _row_weights(grad_loss.to(stats.dtype), labels, student.shape[:-1], ignore_index,
                           ctx.reduction)
    grad_s, grad_t = torch.ops.kdfast.kd_loss_backward(
        weights, student, teacher, labels, stats, temperature, alpha, divergence, beta,
        ignore_index, softcap, need_s, need_t)
    return (grad_s if need_s else None, grad_t if need_t else None, *nones)


torch.library.register_autograd("kdfast::kd_loss_fused", _backward, setup_context=_setup_context)
