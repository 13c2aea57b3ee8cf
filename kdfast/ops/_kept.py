"""The kept-gradient backward shared by the fused ops (``kd_loss_fused``,
``dkd_loss_fused``, ``feature_loss_fused``, ``attention_transfer_fused``).

A fused op returns ``(loss, stats, grad_student, grad_teacher)``: the loss, O(rows)
statistics and, for the inputs flagged, d loss / d input at an incoming gradient of 1,
computed in the same pass over the inputs. Its backward then has two paths:

- **kept gradient**: the kept gradient is scaled in place by the incoming gradient with
  ``kdfast::kd_loss_scale_grad_`` (which skips rows whose scale is exactly 1) and handed
  to autograd, which adopts the buffer as ``.grad``: no second gradient-sized buffer and
  no pass over the inputs. When the graph is kept for another backward
  (``retain_graph=True``, ``create_graph=True``) a scaled copy is returned instead, so
  every backward gives the same bits. Under tracing (``torch.compile``, ``opcheck``'s
  AOT checks) the scaling is out of place, so the traced graph stays functional.
- **recompute** (a needed gradient was not computed in the forward, e.g. float16, see
  :func:`gradient_in_forward`): the op's ``*_backward`` recomputes it from the inputs and
  the statistics; that part is the op's own.
"""

from __future__ import annotations

import torch


def acc_dtype(x: torch.Tensor) -> torch.dtype:
    """dtype of a fused op's loss and statistics: float64 for float64 inputs, else float32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def empty_or_like(x: torch.Tensor, wanted: bool) -> torch.Tensor:
    """A fused op's gradient output in fake / meta kernels: contiguous like ``x``, or an
    empty tensor when not requested."""
    if wanted:
        return torch.empty_like(x, memory_format=torch.contiguous_format)
    return x.new_empty(0)


def gradient_in_forward(x: torch.Tensor) -> bool:
    """Whether a fused op should compute (and keep) the gradient of ``x`` in its forward.

    Yes when autograd will need it, except for float16: a float16 gradient kept at
    scale 1 loses its small entries to underflow before the backward multiplies in the
    loss scale (``torch.amp.GradScaler``), so float16 gradients are recomputed in the
    backward, where the scale is known (one more read of the inputs).
    """
    return torch.is_grad_enabled() and x.requires_grad and x.dtype != torch.float16


def tracing(*tensors: torch.Tensor) -> bool:
    """True while the op is traced (fake / functional tensors, a dispatch mode, dynamo)
    rather than run: only then must the backward avoid its in-place scaling."""
    if torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack() > 0:
        return True
    return any(type(t) is not torch.Tensor for t in tensors)


def keep(ctx, grad_student: torch.Tensor, grad_teacher: torch.Tensor, student_requires_grad: bool,
         teacher_requires_grad: bool) -> None:
    """Records the forward's gradients on ``ctx`` (call from ``setup_context``; the
    gradient outputs must be marked non-differentiable by the caller)."""
    # No zero-filled stand-ins for the gradients of the non-differentiable outputs: for
    # grad_student / grad_teacher they would be gradient-sized.
    ctx.set_materialize_grads(False)
    # Held as attributes, not saved tensors: the backward scales them in place and hands
    # them to autograd, and drops its own reference first so that autograd can take the
    # buffer without a copy.
    ctx.kept = (grad_student if student_requires_grad else None,
                grad_teacher if teacher_requires_grad else None)


def _scaled(kept: torch.Tensor, grad_loss: torch.Tensor, per_row: bool, traced: bool,
            keep_graph: bool) -> torch.Tensor:
    if traced:
        scale = grad_loss.unsqueeze(-1) if per_row else grad_loss
        return (kept * scale).to(kept.dtype)
    out = kept.clone() if keep_graph else kept
    # One scale for every element: a gradient in another dense layout (channels_last)
    # is scaled through a flat alias of its memory.
    target = out if per_row or out.is_contiguous() else out.as_strided((out.numel(),), (1,))
    torch.ops.kdfast.kd_loss_scale_grad_(target, grad_loss)
    return out


def kept_gradients(ctx, grad_loss: torch.Tensor, need_student: bool, need_teacher: bool,
                   per_row: bool) -> tuple | None:
    """``(grad_student, grad_teacher)`` from the kept gradients scaled by ``grad_loss``
    (``None`` where not needed), or ``None`` when a needed gradient was not kept.

    ``per_row``: ``grad_loss`` holds one value per row of the gradient (reduction
    ``"none"``), else it is 0-dim.
    """
    kept_s, kept_t = ctx.kept
    if (kept_s is None and need_student) or (kept_t is None and need_teacher):
        return None
    traced = tracing(grad_loss, *(k for k in (kept_s, kept_t) if k is not None))
    # retain_graph=True (or create_graph): another backward may follow, so the kept
    # gradient stays as it is and this one gets a scaled copy.
    keep_graph = not traced and torch._C._autograd._get_current_graph_task_keep_graph()
    if not keep_graph:
        ctx.kept = (None, None)  # autograd may now take the buffer without a copy
    grad_s = _scaled(kept_s, grad_loss, per_row, traced, keep_graph) if need_student else None
    grad_t = _scaled(kept_t, grad_loss, per_row, traced, keep_graph) if need_teacher else None
    del kept_s, kept_t
    return grad_s, grad_t
