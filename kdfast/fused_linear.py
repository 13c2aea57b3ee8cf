"""Fused linear (LM-head) distillation: the loss of ``kd_loss(h_s @ W_s.T + b_s, h_t @ W_t.T +
b_t)`` computed chunk by chunk, so that only ``chunk x V`` logits ever exist.

For a language model the distillation loss, not the model, is what runs out of memory:
at N = 8192 tokens and V = 128k the student and teacher logits, their softmaxes and the
logit gradient are tens of GB. Here each chunk of rows goes through

1. the two LM-head products (``torch.mm`` / ``addmm``: cuBLAS, oneDNN / MKL),
2. ``kdfast::kd_loss_fused`` (or ``kdfast::sparse_kd_loss_fused`` for a sparse cached
   teacher): the chunk's loss and, in the same pass over its logits, the gradient of the
   loss with respect to the student's logits,
3. the gradient products: ``grad_hidden[chunk] = G @ W_s``, ``grad_W_s += G.T @ h_s[chunk]``,
   ``grad_b_s += G.sum(0)`` (accumulated in float32),

and the chunk's buffers are dropped before the next one. The gradients are computed in
the forward (when autograd will need them) and only scaled by the incoming gradient in
the backward, so the logits are never recomputed; for ``reduction="none"`` the backward
needs each row's weight, so it recomputes the products chunk by chunk instead.
"""

# The custom ops' schemas are inferred from their annotations at import time, and Python 3.9
# cannot evaluate ``Tensor | None``: this file keeps ``Optional``.
# ruff: noqa: UP045

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from kdfast import _extension, reference
from kdfast._args import REDUCTIONS, SPARSE_TAILS, check_options

__all__ = ["FusedLinearKDLoss", "FusedLinearSparseKDLoss", "auto_chunk_size", "fused_linear_kd_loss",
           "fused_linear_sparse_kd_loss"]

_SUM, _NONE = REDUCTIONS.index("sum"), REDUCTIONS.index("none")
_DTYPES = (torch.float32, torch.bfloat16, torch.float64)
#: The devices the ops are registered for (the same composite code: torch's products and the
#: loss kernels of each device).
_DEVICES = ("cpu", "cuda")
#: Bytes of chunk buffers (student logits, their gradient, teacher logits) aimed at on the CPU:
#: 512 rows of the SmolLM head (V=49152, fp32), the fastest of 128 to 1024 rows measured there
#: (benchmarks/results/cpu-intel-xeon-2c/fused_linear_chunks.md).
CPU_CHUNK_BYTES = 288 << 20
#: The most bytes of chunk buffers on a GPU (and at most a quarter of its free memory).
GPU_CHUNK_BYTES = 2 << 30


def auto_chunk_size(rows: int, vocab: int, bytes_per_logit: int, device: torch.device) -> int:
    """Rows per chunk: as many as fit :data:`CPU_CHUNK_BYTES` on the CPU, or on a GPU
    the smaller of :data:`GPU_CHUNK_BYTES` and a quarter of the free memory, for
    ``bytes_per_logit`` bytes of buffers per logit; a multiple of 16 when above 16.

    Example::

        >>> auto_chunk_size(8192, 49152, 12, torch.device("cpu"))
        512
    """
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        budget = min(GPU_CHUNK_BYTES, free // 4)
    else:
        budget = CPU_CHUNK_BYTES
    chunk = max(1, budget // max(vocab * bytes_per_logit, 1))
    if chunk > 16:
        chunk -= chunk % 16
    return int(min(chunk, max(rows, 1)))


# ----------------------------------------------------------------------------- the chunk loop


def _acc(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _linear(h: Tensor, w: Tensor, b: Optional[Tensor], buf: Optional[Tensor] = None) -> Tensor:
    """``h @ w.T + b``, written into the first rows of ``buf`` when given (a chunk buffer
    allocated once: fresh ``chunk x V`` allocations cost page faults on every chunk)."""
    out = None if buf is None else buf[:h.shape[0]]
    return torch.mm(h, w.t(), out=out) if b is None else torch.addmm(b, h, w.t(), out=out)


def _kept_rows(labels: Optional[Tensor], ignore_index: int, rows: int, device: torch.device
               ) -> Optional[Tensor]:
    """Indices of the rows whose label is not ``ignore_index`` when some are ignored, else
    ``None``. Reading the count back synchronises with the device, so while a CUDA graph
    is captured every row is processed instead (ignored rows then cost their products)."""
    if labels is None:
        return None
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return None
    kept = (labels != ignore_index).nonzero().squeeze(1)
    return None if kept.numel() == rows else kept


class _Grads:
    """Accumulators of the student-side gradients (float32, float64 for float64 inputs)."""

    def __init__(self, h: Tensor, w: Tensor, b: Optional[Tensor], need: int) -> None:
        """``need``: a mask of the wanted gradients, 1 hidden states, 2 weight, 4 bias."""
        self.want_h, self.want_w = bool(need & 1), bool(need & 2)
        self.want_b = bool(need & 4) and b is not None
        self.want, self.acc = self.want_h or self.want_w or self.want_b, _acc(w)
        self.h = torch.empty_like(h) if self.want_h else h.new_empty(0)
        self.w = torch.zeros_like(w, dtype=self.acc) if self.want_w else w.new_empty(0)
        self.b = torch.zeros_like(b, dtype=self.acc) if self.want_b else w.new_empty(0)

    def add(self, g: Tensor, h: Tensor, w: Tensor, has_bias: bool, out_h: Tensor) -> None:
        """Adds one chunk's logit gradient ``g`` ``[c, V]`` (hidden states ``h`` ``[c, H]``);
        its hidden-state gradient goes to ``out_h``."""
        if self.want_h:
            torch.mm(g, w, out=out_h)
        if self.want_w and g.dtype == self.acc:
            self.w.addmm_(g.t(), h)
        elif self.want_w:                   # bfloat16: the chunk's product, summed in float32
            self.w.add_(_mm_acc(g.t(), h, self.acc))
        if has_bias and self.want_b:
            self.b.add_(g.sum(0, dtype=self.acc))

    def result(self, w: Tensor, b: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        return self.h, self.w.to(w.dtype), (self.b.to(b.dtype) if self.want_b else self.b)


def _mm_acc(a: Tensor, b: Tensor, acc: torch.dtype) -> Tensor:
    """``a @ b`` with a float32 result where the backend offers one (CUDA), else rounded."""
    if a.device.type == "cuda":
        try:
            return torch.mm(a, b, out_dtype=acc)
        except (RuntimeError, TypeError):  # pragma: no cover - older torch
            pass
    return torch.mm(a, b)


def _run_chunks(h: Tensor, w: Tensor, b: Optional[Tensor], rows: int, chunk: int, loss_of_chunk,
                kept: Optional[Tensor], reduction: int, grads: _Grads, weights: Optional[Tensor] = None
                ) -> Tensor:
    """The loop shared by the dense and sparse ops: per chunk of (kept) rows, the student
    logits, ``loss_of_chunk(logits, row_index_or_slice, need_grad, reduction)`` ->
    ``(loss, grad)``, and the gradient products. Returns the summed loss (0-dim) or the
    per-row losses ``[rows]``."""
    acc = _acc(h)
    n = rows if kept is None else kept.numel()
    total = torch.zeros((), dtype=acc, device=h.device)
    per_row = torch.zeros(rows, dtype=acc, device=h.device) if reduction == _NONE else None
    hk = h if kept is None else h.index_select(0, kept)
    # the student logits of every chunk go to one buffer: the loss kernel returns the logit
    # gradient in a new tensor, and a chunk's logits are dropped before the next chunk
    s_buf = h.new_empty(min(chunk, n), w.shape[0]) if n > 0 else None
    gh = grads.h if kept is None or not grads.want_h else torch.empty_like(hk)
    for lo in range(0, n, chunk):
        hi = min(lo + chunk, n)
        where = slice(lo, hi) if kept is None else kept[lo:hi]
        hc = hk[lo:hi]
        s = _linear(hc, w, b, s_buf)
        loss, g = loss_of_chunk(s, where, grads.want, _NONE if reduction == _NONE else _SUM)
        del s
        if per_row is not None:
            if kept is None:
                per_row[lo:hi] = loss
            else:
                per_row.index_copy_(0, where, loss.to(acc))
        else:
            total += loss
        if grads.want:
            if weights is not None:
                g.mul_(weights[where].to(g.dtype).unsqueeze(1))
            grads.add(g, hc, w, b is not None, gh[lo:hi])
        del g
    if grads.want_h and kept is not None:
        grads.h = torch.zeros_like(h).index_copy_(0, kept, gh)
    return per_row if per_row is not None else total


def _chunk_for(chunk_size: int, rows: int, vocab: int, s: Tensor, extra_bytes: int) -> int:
    if chunk_size > 0:
        return min(chunk_size, max(rows, 1))
    return auto_chunk_size(rows, vocab, 2 * s.element_size() + extra_bytes, s.device)


# ----------------------------------------------------------------------------- dense teacher


def _dense_chunk_loss(th: Tensor, tw: Tensor, tb: Optional[Tensor], labels: Optional[Tensor],
                      opts: tuple):
    temperature, alpha, divergence, beta, ignore_index, softcap = opts

    buf: list[Tensor] = []              # the teacher logits' buffer, sized by the first (largest) chunk

    def loss_of_chunk(s: Tensor, where, need: bool, reduction: int) -> tuple[Tensor, Tensor]:
        if not buf:
            buf.append(th.new_empty(s.shape[0], tw.shape[0]))
        t = _linear(th[where], tw, tb, buf[0])
        lab = None if labels is None else labels[where]
        args = (s, t, lab, temperature, alpha, divergence, beta, ignore_index, softcap, reduction, need,
                False)
        if _extension.has_kernel_cached("kd_loss_fused", s.device.type):
            loss, _, g, _ = torch.ops.kdfast.kd_loss_fused(*args)
        else:
            loss, _, g, _ = reference.kd_loss_fused(*args)
        return loss, g
    return loss_of_chunk


def _forward_pass(sh: Tensor, sw: Tensor, sb: Optional[Tensor], labels: Optional[Tensor], ignore_index: int,
                  reduction: int, chunk_size: int, need_grad: int, teacher_bytes: int, loss_of_chunk
                  ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The forward of both ops: the chunk loop, the reduction, and the kept gradients
    (``need_grad``, not for ``"none"``) scaled by it. ``teacher_bytes``: the teacher's
    bytes per logit in a chunk (0 for a sparse teacher)."""
    rows, vocab = sh.shape[0], sw.shape[0]
    with torch.no_grad():
        kept = _kept_rows(labels, ignore_index, rows, sh.device)
        chunk = _chunk_for(chunk_size, rows, vocab, sh, teacher_bytes)
        grads = _Grads(sh, sw, sb, need_grad if reduction != _NONE else 0)
        loss = _run_chunks(sh, sw, sb, rows, chunk, loss_of_chunk, kept, reduction, grads)
        loss, scale = _reduce(loss, labels, ignore_index, rows, kept, reduction)
        gh, gw, gb = grads.result(sw, sb)
        if grads.want and scale is not None:
            gh, gw, gb = gh.mul_(scale.to(gh.dtype)), gw.mul_(scale.to(gw.dtype)), gb.mul_(scale.to(gb.dtype))
    return loss, gh, gw, gb


def _recompute_pass(grad_loss: Tensor, sh: Tensor, sw: Tensor, sb: Optional[Tensor], labels: Optional[Tensor],
                    ignore_index: int, chunk_size: int, need_grad: int, teacher_bytes: int, loss_of_chunk
                    ) -> tuple[Tensor, Tensor, Tensor]:
    """The per-row (``reduction="none"``) backward of both ops: the products again, each
    row's logit gradient weighted by its incoming gradient."""
    rows, vocab = sh.shape[0], sw.shape[0]
    with torch.no_grad():
        kept = _kept_rows(labels, ignore_index, rows, sh.device)
        chunk = _chunk_for(chunk_size, rows, vocab, sh, teacher_bytes)
        grads = _Grads(sh, sw, sb, need_grad)
        _run_chunks(sh, sw, sb, rows, chunk, loss_of_chunk, kept, _NONE, grads, weights=grad_loss)
        return grads.result(sw, sb)


def _fake_forward(sh: Tensor, sw: Tensor, sb: Optional[Tensor], reduction: int, need: int) -> tuple:
    shape = (sh.shape[0],) if reduction == _NONE else ()
    return sh.new_empty(shape, dtype=_acc(sh)), *_fake_grads(sh, sw, sb, need if reduction != _NONE else 0)


def _backward_of(ctx, grad_loss: Tensor, recompute, fn: str) -> tuple:
    """The autograd backward of both ops: the kept gradients scaled, or for ``"none"``
    ``recompute(need)`` -> the gradients recomputed with the row weights."""
    if ctx.reduction == _NONE:
        need = sum(bit for bit, n in zip((1, 2, 4), ctx.needs_input_grad[:3]) if n)
        return tuple(g if bit & need else None for g, bit in zip(recompute(need), (1, 2, 4)))
    return _scaled(ctx, ctx.saved_tensors, grad_loss, fn)


@torch.library.custom_op("kdfast::fused_linear_kd", mutates_args=(), device_types=_DEVICES)
def _fused_linear_kd(sh: Tensor, sw: Tensor, sb: Optional[Tensor], th: Tensor, tw: Tensor,
                     tb: Optional[Tensor], labels: Optional[Tensor], temperature: float, alpha: float,
                     divergence: int, beta: float, ignore_index: int, softcap: float, reduction: int,
                     chunk_size: int, need_grad: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    chunk_loss = _dense_chunk_loss(th, tw, tb, labels, (temperature, alpha, divergence, beta, ignore_index,
                                                        softcap))
    return _forward_pass(sh, sw, sb, labels, ignore_index, reduction, chunk_size, need_grad,
                         tw.element_size(), chunk_loss)


@torch.library.custom_op("kdfast::fused_linear_kd_backward", mutates_args=(), device_types=_DEVICES)
def _fused_linear_kd_backward(grad_loss: Tensor, sh: Tensor, sw: Tensor, sb: Optional[Tensor], th: Tensor,
                              tw: Tensor, tb: Optional[Tensor], labels: Optional[Tensor],
                              temperature: float, alpha: float, divergence: int, beta: float,
                              ignore_index: int, softcap: float, chunk_size: int, need_grad: int
                              ) -> tuple[Tensor, Tensor, Tensor]:
    return _recompute_pass(grad_loss, sh, sw, sb, labels, ignore_index, chunk_size, need_grad,
                           tw.element_size(),
                           _dense_chunk_loss(th, tw, tb, labels, (temperature, alpha, divergence, beta,
                                                                  ignore_index, softcap)))


def _reduce(loss: Tensor, labels: Optional[Tensor], ignore_index: int, rows: int, kept: Optional[Tensor],
            reduction: int) -> tuple[Tensor, Optional[Tensor]]:
    """The reduced loss and the factor of the summed gradients (``None``: 1)."""
    if reduction != REDUCTIONS.index("batchmean"):
        return loss, None
    if labels is None:
        count = torch.tensor(float(max(rows, 1)), dtype=loss.dtype, device=loss.device)
    elif kept is not None:
        count = torch.tensor(float(max(kept.numel(), 1)), dtype=loss.dtype, device=loss.device)
    else:
        count = (labels != ignore_index).sum().clamp_(min=1).to(loss.dtype)
    scale = 1.0 / count
    return loss * scale, scale


def _empty_or_like(x: Optional[Tensor], want: int, other: Tensor) -> Tensor:
    return torch.empty_like(x) if want and x is not None else other.new_empty(0)


def _fake_grads(sh: Tensor, sw: Tensor, sb: Optional[Tensor], need: int) -> tuple[Tensor, Tensor, Tensor]:
    return (_empty_or_like(sh, need & 1, sh), _empty_or_like(sw, need & 2, sw),
            _empty_or_like(sb, need & 4, sw))


@_fused_linear_kd.register_fake
def _(sh, sw, sb, th, tw, tb, labels, temperature, alpha, divergence, beta, ignore_index, softcap,
      reduction, chunk_size, need_grad):
    return _fake_forward(sh, sw, sb, reduction, need_grad)


@_fused_linear_kd_backward.register_fake
def _(grad_loss, sh, sw, sb, th, tw, tb, labels, temperature, alpha, divergence, beta, ignore_index,
      softcap, chunk_size, need_grad):
    return _fake_grads(sh, sw, sb, need_grad)


def _dense_setup(ctx, inputs, output):
    (sh, sw, sb, th, tw, tb, labels, temperature, alpha, divergence, beta, ignore_index, softcap,
     reduction, chunk_size, need_grad) = inputs
    _, gh, gw, gb = output
    ctx.reduction, ctx.need = reduction, need_grad if sb is not None else need_grad & 3
    ctx.options = (temperature, alpha, divergence, beta, ignore_index, softcap, chunk_size)
    if reduction == _NONE:
        ctx.save_for_backward(sh, sw, sb, th, tw, tb, labels)
    else:
        ctx.save_for_backward(gh, gw, gb)


def _scaled(ctx, grads: tuple[Tensor, Tensor, Tensor], grad_loss: Tensor, fn: str) -> tuple:
    """The kept gradients times the incoming gradient; ``None`` for those not computed."""
    if ctx.need == 0:
        raise RuntimeError(f"{fn}: the forward ran without gradients (no_grad, or no student tensor "
                           "requiring grad); run it again with grad enabled")
    return tuple(g * grad_loss.to(g.dtype) if ctx.need & bit else None for g, bit in zip(grads, (1, 2, 4)))


def _dense_backward(ctx, grad_loss, _gh, _gw, _gb):
    nones = (None,) * 13
    if grad_loss is None:
        return (None, None, None, *nones)

    def recompute(need: int) -> tuple[Tensor, Tensor, Tensor]:
        return torch.ops.kdfast.fused_linear_kd_backward(grad_loss, *ctx.saved_tensors, *ctx.options, need)
    return (*_backward_of(ctx, grad_loss, recompute, "fused_linear_kd_loss"), *nones)


_fused_linear_kd.register_autograd(_dense_backward, setup_context=_dense_setup)


# ----------------------------------------------------------------------------- sparse teacher


def _sparse_chunk_loss(indices: Tensor, values: Tensor, labels: Optional[Tensor], opts: tuple):
    temperature, alpha, logprobs, tail, ignore_index = opts

    def loss_of_chunk(s: Tensor, where, need: bool, reduction: int) -> tuple[Tensor, Tensor]:
        lab = None if labels is None else labels[where]
        idx, val = indices[where], values[where]
        if _extension.has_kernel_cached("sparse_kd_loss_fused", s.device.type):
            loss, _, g = torch.ops.kdfast.sparse_kd_loss_fused(
                s, idx, val, lab, temperature, alpha, logprobs, tail, ignore_index, reduction, need)
            return loss, g
        x = s.detach().to(_acc(s)).requires_grad_(need)
        with torch.enable_grad():
            loss = reference.sparse_kd_loss(
                x, idx, val, lab, values="logprobs" if logprobs else "probs", temperature=temperature,
                tail=SPARSE_TAILS[tail], alpha=alpha, ignore_index=ignore_index,
                reduction=REDUCTIONS[reduction])
            g = torch.autograd.grad(loss.sum(), x)[0].to(s.dtype) if need else s.new_empty(0)
        return loss.detach(), g
    return loss_of_chunk


@torch.library.custom_op("kdfast::fused_linear_sparse_kd", mutates_args=(), device_types=_DEVICES)
def _fused_linear_sparse_kd(sh: Tensor, sw: Tensor, sb: Optional[Tensor], indices: Tensor, values: Tensor,
                            labels: Optional[Tensor], temperature: float, alpha: float, logprobs: bool,
                            tail: int, ignore_index: int, reduction: int, chunk_size: int, need_grad: int
                            ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return _forward_pass(sh, sw, sb, labels, ignore_index, reduction, chunk_size, need_grad, 0,
                         _sparse_chunk_loss(indices, values, labels,
                                            (temperature, alpha, logprobs, tail, ignore_index)))


@torch.library.custom_op("kdfast::fused_linear_sparse_kd_backward", mutates_args=(), device_types=_DEVICES)
def _fused_linear_sparse_kd_backward(grad_loss: Tensor, sh: Tensor, sw: Tensor, sb: Optional[Tensor],
                                     indices: Tensor, values: Tensor, labels: Optional[Tensor],
                                     temperature: float, alpha: float, logprobs: bool, tail: int,
                                     ignore_index: int, chunk_size: int, need_grad: int
                                     ) -> tuple[Tensor, Tensor, Tensor]:
    return _recompute_pass(grad_loss, sh, sw, sb, labels, ignore_index, chunk_size, need_grad, 0,
                           _sparse_chunk_loss(indices, values, labels,
                                              (temperature, alpha, logprobs, tail, ignore_index)))


@_fused_linear_sparse_kd.register_fake
def _(sh, sw, sb, indices, values, labels, temperature, alpha, logprobs, tail, ignore_index, reduction,
      chunk_size, need_grad):
    return _fake_forward(sh, sw, sb, reduction, need_grad)


@_fused_linear_sparse_kd_backward.register_fake
def _(grad_loss, sh, sw, sb, indices, values, labels, temperature, alpha, logprobs, tail, ignore_index,
      chunk_size, need_grad):
    return _fake_grads(sh, sw, sb, need_grad)


def _sparse_setup(ctx, inputs, output):
    (sh, sw, sb, indices, values, labels, temperature, alpha, logprobs, tail, ignore_index, reduction,
     chunk_size, need_grad) = inputs
    _, gh, gw, gb = output
    ctx.reduction, ctx.need = reduction, need_grad if sb is not None else need_grad & 3
    ctx.options = (temperature, alpha, logprobs, tail, ignore_index, chunk_size)
    if reduction == _NONE:
        ctx.save_for_backward(sh, sw, sb, indices, values, labels)
    else:
        ctx.save_for_backward(gh, gw, gb)


def _sparse_backward(ctx, grad_loss, _gh, _gw, _gb):
    nones = (None,) * 11
    if grad_loss is None:
        return (None, None, None, *nones)

    def recompute(need: int) -> tuple[Tensor, Tensor, Tensor]:
        return torch.ops.kdfast.fused_linear_sparse_kd_backward(grad_loss, *ctx.saved_tensors, *ctx.options,
                                                                need)
    return (*_backward_of(ctx, grad_loss, recompute, "fused_linear_sparse_kd_loss"), *nones)


_fused_linear_sparse_kd.register_autograd(_sparse_backward, setup_context=_sparse_setup)


# ----------------------------------------------------------------------------- public API


def _check_linear(fn: str, hidden: Tensor, weight: Tensor, bias: Optional[Tensor], side: str
                  ) -> tuple[Tensor, Optional[Tensor]]:
    """Checks one side's hidden states ``[..., H]``, weight ``[V, H]`` and bias ``[V]``;
    returns the hidden states as ``[N, H]`` and the bias."""
    for name, x in ((f"{side}_hidden", hidden), (f"{side}_weight", weight)):
        if not isinstance(x, Tensor):
            raise TypeError(f"{fn}: {name} must be a tensor, got {type(x).__name__}")
        if x.dtype not in _DTYPES:
            raise TypeError(f"{fn}: {name} must be float32, bfloat16 or float64 (float16 gradients would "
                            f"underflow at scale 1; use bfloat16), got {x.dtype}")
    if hidden.dim() < 1 or weight.dim() != 2:
        raise ValueError(f"{fn}: {side}_hidden must be [..., H] and {side}_weight [V, H], got "
                         f"{list(hidden.shape)} and {list(weight.shape)}")
    if hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"{fn}: the hidden size of {side}_hidden ({hidden.shape[-1]}) and of "
                         f"{side}_weight ({weight.shape[1]}, [V, H]) differ")
    if hidden.dtype != weight.dtype:
        raise TypeError(f"{fn}: {side}_hidden and {side}_weight must have one dtype, got {hidden.dtype} "
                        f"and {weight.dtype}")
    if hidden.device != weight.device:
        raise ValueError(f"{fn}: {side}_hidden and {side}_weight are on different devices "
                         f"({hidden.device}, {weight.device})")
    if bias is not None:
        if not isinstance(bias, Tensor) or bias.shape != weight.shape[:1]:
            raise ValueError(f"{fn}: {side}_bias must be a [V] = [{weight.shape[0]}] tensor, got "
                             f"{list(bias.shape) if isinstance(bias, Tensor) else type(bias).__name__}")
        if bias.dtype != weight.dtype or bias.device != weight.device:
            raise TypeError(f"{fn}: {side}_bias must have {side}_weight's dtype and device")
    return hidden.reshape(-1, hidden.shape[-1]), bias


def _check_labels(fn: str, labels: Optional[Tensor], lead: torch.Size, alpha: float,
                  device: torch.device) -> Optional[Tensor]:
    if labels is None:
        if alpha > 0:
            raise ValueError(f"{fn}: labels are needed when alpha > 0")
        return None
    if not isinstance(labels, Tensor) or labels.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{fn}: labels must be an int64 (or int32) tensor")
    if labels.shape != lead:
        raise ValueError(f"{fn}: labels must have the hidden states' leading shape {list(lead)}, got "
                         f"{list(labels.shape)}")
    if labels.device != device:
        raise ValueError(f"{fn}: labels are on {labels.device}, the hidden states on {device}")
    return labels.reshape(-1).long()


def _check_chunk(fn: str, chunk_size: Optional[int]) -> int:
    if chunk_size is None:
        return 0
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"{fn}: chunk_size must be an int >= 1 or None, got {chunk_size!r}")
    return chunk_size


def _needs_grad(hidden: Tensor, weight: Tensor, bias: Optional[Tensor]) -> int:
    """The mask of the student gradients autograd will want: 1 hidden, 2 weight, 4 bias."""
    if not torch.is_grad_enabled():
        return 0
    return (int(hidden.requires_grad) | int(weight.requires_grad) << 1
            | int(bias is not None and bias.requires_grad) << 2)


def fused_linear_kd_loss(student_hidden: Tensor, student_weight: Tensor, teacher_hidden: Tensor,
                         teacher_weight: Tensor, labels: Optional[Tensor] = None, *,
                         student_bias: Optional[Tensor] = None, teacher_bias: Optional[Tensor] = None,
                         temperature: float = 1.0, alpha: float = 0.0, divergence: str = "forward_kl",
                         beta: float = 0.5, ignore_index: int = -100, reduction: str = "batchmean",
                         softcap: Optional[float] = None, chunk_size: Optional[int] = None) -> Tensor:
    r"""``kd_loss`` of two linear heads without materialising their logits.

    The same value and gradients as::

        kdfast.kd_loss(student_hidden @ student_weight.T + student_bias,
                       teacher_hidden @ teacher_weight.T + teacher_bias, labels, ...)

    computed ``chunk_size`` rows at a time: per chunk, the two products (``torch.mm`` /
    ``addmm``), ``kdfast::kd_loss_fused`` for the chunk's loss and its logit gradient in
    one pass, and the gradient products (``grad_hidden = G @ W``, ``grad_W += G.T @ h``,
    ``grad_b += G.sum(0)``, accumulated in float32). Rows whose label is
    ``ignore_index`` are dropped before any product (the count is read back once, a
    device synchronisation; not while a CUDA graph is captured, when they are computed
    and weigh nothing).

    The teacher side is treated as frozen: ``teacher_hidden``, ``teacher_weight`` and
    ``teacher_bias`` get no gradient (use :func:`kdfast.kd_loss` on materialised logits
    for online distillation).

    Memory: at most one chunk's student logits, their gradient and the teacher's logits
    (``chunk x V`` each) at a time; the student's gradients (``[N, Hs]``, ``[V, Hs]``,
    ``[V]``) are computed in the forward and kept until the backward, which scales them
    by the incoming gradient (``reduction="none"``: the backward recomputes the products
    chunk by chunk instead, with each row's weight).

    Args:
        student_hidden: ``[..., Hs]`` float32 / bfloat16 (float64 for checks).
        student_weight: ``[V, Hs]``, same dtype (an LM head's ``weight``).
        teacher_hidden: ``[..., Ht]`` with the student's leading shape; ``Ht`` may differ.
        teacher_weight: ``[V, Ht]``, same dtype as ``teacher_hidden`` (may differ from the student's).
        labels: ``[...]`` integer targets (needed when ``alpha > 0``); ``ignore_index`` rows
            contribute nothing and are not counted.
        student_bias, teacher_bias: optional ``[V]`` biases.
        temperature, alpha, divergence, beta, ignore_index, reduction, softcap: as in
            :func:`kdfast.kd_loss`.
        chunk_size: rows per chunk; ``None`` picks one from ``V`` and the free memory
            (:func:`auto_chunk_size`).

    Returns:
        float32 loss (float64 for float64 inputs): 0-dim, or ``[...]`` for ``"none"``.

    Example::

        >>> import torch, kdfast
        >>> h_s, w_s = torch.randn(64, 32, requires_grad=True), torch.randn(1000, 32, requires_grad=True)
        >>> h_t, w_t = torch.randn(64, 48), torch.randn(1000, 48)
        >>> labels = torch.randint(0, 1000, (64,))
        >>> loss = kdfast.fused_linear_kd_loss(h_s, w_s, h_t, w_t, labels, temperature=2.0, alpha=0.5,
        ...                                    chunk_size=16)
        >>> loss.backward()
        >>> ref = kdfast.kd_loss(h_s @ w_s.T, h_t @ w_t.T, labels, temperature=2.0, alpha=0.5)
        >>> torch.allclose(loss, ref, rtol=1e-5, atol=1e-6)
        True
    """
    fn = "fused_linear_kd_loss"
    div_code = check_options(temperature, alpha, divergence, beta, reduction, ignore_index, softcap)
    sh, sb = _check_linear(fn, student_hidden, student_weight, student_bias, "student")
    th, tb = _check_linear(fn, teacher_hidden, teacher_weight, teacher_bias, "teacher")
    lead = student_hidden.shape[:-1]
    if teacher_hidden.shape[:-1] != lead:
        raise ValueError(f"{fn}: student_hidden and teacher_hidden must have the same leading shape, got "
                         f"{list(lead)} and {list(teacher_hidden.shape[:-1])}")
    if teacher_weight.shape[0] != student_weight.shape[0]:
        raise ValueError(f"{fn}: the vocabulary sizes differ: student_weight has {student_weight.shape[0]} "
                         f"rows, teacher_weight {teacher_weight.shape[0]}")
    if teacher_hidden.device != student_hidden.device:
        raise ValueError(f"{fn}: the student is on {student_hidden.device}, the teacher on "
                         f"{teacher_hidden.device}")
    lab = _check_labels(fn, labels, lead, alpha, student_hidden.device)
    red = REDUCTIONS.index(reduction)
    loss, _, _, _ = torch.ops.kdfast.fused_linear_kd(
        sh, student_weight, sb, th.detach(), teacher_weight.detach(),
        None if tb is None else tb.detach(), lab, float(temperature), float(alpha), div_code, float(beta),
        int(ignore_index), 0.0 if softcap is None else float(softcap), red, _check_chunk(fn, chunk_size),
        _needs_grad(student_hidden, student_weight, student_bias))
    return loss.reshape(lead) if red == _NONE else loss


def fused_linear_sparse_kd_loss(student_hidden: Tensor, student_weight: Tensor, teacher_indices: Tensor,
                                teacher_values: Tensor, labels: Optional[Tensor] = None, *,
                                student_bias: Optional[Tensor] = None, values: str = "logprobs",
                                temperature: float = 1.0, tail: str = "renormalize", alpha: float = 0.0,
                                ignore_index: int = -100, reduction: str = "batchmean",
                                chunk_size: Optional[int] = None) -> Tensor:
    r"""``sparse_kd_loss`` of a linear head against a sparse (cached) teacher, without
    materialising the student's logits.

    The same value and gradients as ``kdfast.sparse_kd_loss(student_hidden @
    student_weight.T + student_bias, teacher_indices, teacher_values, labels, ...)``
    (``values`` / ``tail`` semantics as there), computed chunk by chunk as in
    :func:`fused_linear_kd_loss` with ``kdfast::sparse_kd_loss_fused``: offline LLM
    distillation from a :mod:`kdfast.cache` top-k or sampled cache where neither the
    teacher's nor the student's ``[N, V]`` logits ever exist.

    Args:
        student_hidden: ``[..., Hs]`` float32 / bfloat16 (float64 for checks).
        student_weight: ``[V, Hs]``; ``student_bias``: optional ``[V]``.
        teacher_indices: ``[..., K]`` int64 token ids, ``-1`` for padding.
        teacher_values: ``[..., K]`` float log-probabilities or probabilities at ``temperature``.
        labels, values, temperature, tail, alpha, ignore_index, reduction: as in
            :func:`kdfast.sparse_kd_loss`.
        chunk_size: rows per chunk (``None``: :func:`auto_chunk_size`).

    Memory: one chunk's student logits and their gradient at a time, plus the student's
    gradients (kept from forward to backward, as in :func:`fused_linear_kd_loss`).

    Example::

        >>> import torch, kdfast
        >>> h, w = torch.randn(64, 32, requires_grad=True), torch.randn(1000, 32, requires_grad=True)
        >>> idx, logp = kdfast.topk_logits(torch.randn(64, 1000), 8, temperature=2.0)
        >>> loss = kdfast.fused_linear_sparse_kd_loss(h, w, idx, logp, temperature=2.0, tail="residual")
        >>> loss.backward()
    """
    fn = "fused_linear_sparse_kd_loss"
    from kdfast._args import check_sparse_kd_options

    check_sparse_kd_options(values, temperature, tail, alpha, ignore_index, reduction)
    sh, sb = _check_linear(fn, student_hidden, student_weight, student_bias, "student")
    lead = student_hidden.shape[:-1]
    for name, x in (("teacher_indices", teacher_indices), ("teacher_values", teacher_values)):
        if not isinstance(x, Tensor):
            raise TypeError(f"{fn}: {name} must be a tensor, got {type(x).__name__}")
        if x.dim() < 1 or x.shape[:-1] != lead:
            raise ValueError(f"{fn}: {name} must be [..., K] with the hidden states' leading shape "
                             f"{list(lead)}, got {list(x.shape)}")
        if x.device != student_hidden.device:
            raise ValueError(f"{fn}: {name} is on {x.device}, the hidden states on {student_hidden.device}")
    if teacher_indices.shape != teacher_values.shape:
        raise ValueError(f"{fn}: teacher_indices and teacher_values must have the same shape, got "
                         f"{list(teacher_indices.shape)} and {list(teacher_values.shape)}")
    if teacher_indices.dtype not in (torch.int64, torch.int32) or not teacher_values.is_floating_point():
        raise TypeError(f"{fn}: teacher_indices must be integer and teacher_values floating point")
    lab = _check_labels(fn, labels, lead, alpha, student_hidden.device)
    k = teacher_indices.shape[-1]
    red = REDUCTIONS.index(reduction)
    loss, _, _, _ = torch.ops.kdfast.fused_linear_sparse_kd(
        sh, student_weight, sb, teacher_indices.reshape(-1, k).long(),
        teacher_values.detach().reshape(-1, k), lab, float(temperature), float(alpha),
        values == "logprobs", SPARSE_TAILS.index(tail), int(ignore_index), red, _check_chunk(fn, chunk_size),
        _needs_grad(student_hidden, student_weight, student_bias))
    return loss.reshape(lead) if red == _NONE else loss


class FusedLinearKDLoss(nn.Module):
    """:func:`fused_linear_kd_loss` as a module (options fixed at construction).

    Example::

        >>> import torch, kdfast
        >>> crit = kdfast.FusedLinearKDLoss(temperature=2.0, alpha=0.1)
        >>> head_s, head_t = torch.nn.Linear(32, 500, bias=False), torch.nn.Linear(48, 500, bias=False)
        >>> h_s, h_t = torch.randn(8, 16, 32), torch.randn(8, 16, 48)
        >>> labels = torch.randint(0, 500, (8, 16))
        >>> crit(h_s, head_s.weight, h_t, head_t.weight, labels).backward()
    """

    def __init__(self, *, temperature: float = 1.0, alpha: float = 0.0, divergence: str = "forward_kl",
                 beta: float = 0.5, ignore_index: int = -100, reduction: str = "batchmean",
                 softcap: Optional[float] = None, chunk_size: Optional[int] = None) -> None:
        super().__init__()
        check_options(temperature, alpha, divergence, beta, reduction, ignore_index, softcap)
        _check_chunk("FusedLinearKDLoss", chunk_size)
        self.options = dict(temperature=temperature, alpha=alpha, divergence=divergence, beta=beta,
                            ignore_index=ignore_index, reduction=reduction, softcap=softcap,
                            chunk_size=chunk_size)

    def forward(self, student_hidden: Tensor, student_weight: Tensor, teacher_hidden: Tensor,
                teacher_weight: Tensor, labels: Optional[Tensor] = None, *,
                student_bias: Optional[Tensor] = None, teacher_bias: Optional[Tensor] = None) -> Tensor:
        return fused_linear_kd_loss(student_hidden, student_weight, teacher_hidden, teacher_weight, labels,
                                    student_bias=student_bias, teacher_bias=teacher_bias, **self.options)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())


class FusedLinearSparseKDLoss(nn.Module):
    """:func:`fused_linear_sparse_kd_loss` as a module (options fixed at construction).

    Example::

        >>> import torch, kdfast
        >>> crit = kdfast.FusedLinearSparseKDLoss(temperature=2.0, tail="residual")
        >>> head = torch.nn.Linear(32, 500)
        >>> idx, logp = kdfast.topk_logits(torch.randn(40, 500), 4, temperature=2.0)
        >>> crit(torch.randn(40, 32), head.weight, idx, logp, student_bias=head.bias).backward()
    """

    def __init__(self, *, values: str = "logprobs", temperature: float = 1.0, tail: str = "renormalize",
                 alpha: float = 0.0, ignore_index: int = -100, reduction: str = "batchmean",
                 chunk_size: Optional[int] = None) -> None:
        super().__init__()
        from kdfast._args import check_sparse_kd_options

        check_sparse_kd_options(values, temperature, tail, alpha, ignore_index, reduction)
        _check_chunk("FusedLinearSparseKDLoss", chunk_size)
        self.options = dict(values=values, temperature=temperature, tail=tail, alpha=alpha,
                            ignore_index=ignore_index, reduction=reduction, chunk_size=chunk_size)

    def forward(self, student_hidden: Tensor, student_weight: Tensor, teacher_indices: Tensor,
                teacher_values: Tensor, labels: Optional[Tensor] = None, *,
                student_bias: Optional[Tensor] = None) -> Tensor:
        return fused_linear_sparse_kd_loss(student_hidden, student_weight, teacher_indices, teacher_values,
                                           labels, student_bias=student_bias, **self.options)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())
