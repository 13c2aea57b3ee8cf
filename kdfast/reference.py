"""Plain-PyTorch reference of every kdfast op.

It is the fallback when the compiled extension is missing, the executable form of
``docs/kd_loss_math.md`` and a readable statement of what each kernel computes.
Math is done in float32 (float64 for float64 inputs), like the kernels.

Example::

    >>> import torch, kdfast
    >>> s, t = torch.randn(4, 10), torch.randn(4, 10)
    >>> kdfast.reference.kd_loss(s, t, temperature=2.0)
    tensor(...)
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from kdfast._args import (
    DIVERGENCES,
    REDUCTIONS,
    FeatureMaps,
    check_at_p,
    check_feature_maps,
    check_label_values,
    check_options,
    check_sample_args,
    check_sparse_kd_options,
    check_sparse_kd_tensors,
    check_teacher_index_values,
    check_tensors,
    check_topk_args,
    feature_map_pairs,
    reduce_rows,
)

Tensor = torch.Tensor


def _acc_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _masked_diff(weight: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """``a - b`` where ``weight > 0``, else 0: a zero-probability term contributes
    nothing, even for ``-inf - (-inf)``, and passes no NaN gradient."""
    keep = weight > 0
    return torch.where(keep, a, 0.0) - torch.where(keep, b, 0.0)


def _log_mixture(log_p: Tensor, log_q: Tensor, beta: float) -> Tensor:
    """``log(beta p + (1 - beta) q)`` in log space: finite while either probability is
    non-zero, even where the products would flush to zero; ``-inf`` where both are 0."""
    both_zero = (log_p == float("-inf")) & (log_q == float("-inf"))
    a = torch.where(both_zero, 0.0, log_p) + math.log(beta)
    b = torch.where(both_zero, 0.0, log_q) + math.log1p(-beta)
    return torch.where(both_zero, float("-inf"), torch.logaddexp(a, b))


def apply_softcap(x: Tensor, softcap: float | None) -> Tensor:
    """Gemma-style ``softcap * tanh(x / softcap)``; ``-inf`` (masked) entries stay ``-inf``.
    Identity for ``softcap=None``."""
    if softcap is None:
        return x
    return torch.where(x == float("-inf"), x, softcap * torch.tanh(x / softcap))


def divergence_rows(student: Tensor, teacher: Tensor, temperature: float, divergence: str,
                    beta: float) -> Tensor:
    """Per-row divergence ``D`` between ``softmax(teacher/T)`` and ``softmax(student/T)``.

    Shapes: ``[N, V]`` in, ``[N]`` out (accumulation dtype).
    """
    # Shift by the row max before scaling: (s - max) / T keeps logits of 1e4 exact.
    log_q = F.log_softmax((student - student.amax(-1, keepdim=True).detach()) / temperature, dim=-1)
    log_p = F.log_softmax((teacher - teacher.amax(-1, keepdim=True).detach()) / temperature, dim=-1)
    p, q = log_p.exp(), log_q.exp()
    if divergence == "forward_kl":
        return (p * _masked_diff(p, log_p, log_q)).sum(-1)
    if divergence == "reverse_kl":
        return (q * _masked_diff(q, log_q, log_p)).sum(-1)
    log_m = _log_mixture(log_p, log_q, beta)
    kl_pm = (p * _masked_diff(p, log_p, log_m)).sum(-1)
    kl_qm = (q * _masked_diff(q, log_q, log_m)).sum(-1)
    # A row with no finite normaliser (all NaN / all -inf) is NaN, not masked to 0.
    undefined = log_q.isnan().all(-1) | log_p.isnan().all(-1)
    return torch.where(undefined, float("nan"), beta * kl_pm + (1.0 - beta) * kl_qm)


def kd_loss_rows(student: Tensor, teacher: Tensor, labels: Tensor | None, temperature: float,
                 alpha: float, divergence: str, beta: float, ignore_index: int,
                 softcap: float | None = None) -> Tensor:
    """Per-row loss ``(1 - alpha) T^2 D + alpha CE`` (0 on ignored rows), on the
    soft-capped logits when ``softcap`` is set.

    Shapes: ``student``, ``teacher`` ``[..., V]``; ``labels`` ``[...]`` or None;
    returns ``[...]`` in float32 (float64 for float64 inputs). Differentiable.
    """
    acc = _acc_dtype(student)
    vocab = student.shape[-1]
    s = student.reshape(-1, vocab).to(acc)
    t = teacher.reshape(-1, vocab).to(acc)
    y = None if labels is None else labels.reshape(-1)
    if y is not None:
        counted = (y != ignore_index).unsqueeze(-1)
        # Zeroed ignored rows keep NaN / inf of unused rows out of the result and gradient.
        s = torch.where(counted, s, 0.0)
        t = torch.where(counted, t, 0.0)
    s, t = apply_softcap(s, softcap), apply_softcap(t, softcap)
    rows = divergence_rows(s, t, temperature, divergence, beta) * ((1.0 - alpha) * temperature**2)
    if alpha > 0:
        rows = rows + alpha * F.cross_entropy(s, y, ignore_index=ignore_index, reduction="none")
    if y is not None:
        rows = torch.where(counted.squeeze(-1), rows, 0.0)
    return rows.reshape(student.shape[:-1])


def kd_loss(student_logits: Tensor, teacher_logits: Tensor, labels: Tensor | None = None, *,
            temperature: float = 1.0, alpha: float = 0.0, divergence: str = "forward_kl",
            beta: float = 0.5, ignore_index: int = -100, reduction: str = "batchmean",
            softcap: float | None = None) -> Tensor:
    """Reference :func:`kdfast.kd_loss`: same arguments, same result, plain PyTorch."""
    check_options(temperature, alpha, divergence, beta, reduction, ignore_index, softcap)
    labels = check_tensors(student_logits, teacher_logits, labels, alpha)
    if labels is not None:
        check_label_values(labels, student_logits.shape[-1], ignore_index)
    rows = kd_loss_rows(student_logits, teacher_logits, labels, temperature, alpha, divergence,
                        beta, ignore_index, softcap)
    return reduce_rows(rows, labels, ignore_index, reduction)


# --- references of the ops themselves (torch.ops.kdfast.*) -------------------------------


def _stats(s: Tensor, t: Tensor, temperature: float, alpha: float, name: str,
           beta: float) -> Tensor:
    """Row statistics ``[N, 7]`` of (capped) ``[N, V]`` logits, see docs/kd_loss_math.md."""
    max_s, max_t = s.amax(-1), t.amax(-1)
    log_z_s = torch.logsumexp((s - max_s[:, None]) / temperature, -1)
    log_z_t = torch.logsumexp((t - max_t[:, None]) / temperature, -1)
    log_z_s1 = (torch.logsumexp(s - max_s[:, None], -1) if alpha > 0
                else torch.zeros_like(log_z_s))
    log_q = (s - max_s[:, None]) / temperature - log_z_s[:, None]
    log_p = (t - max_t[:, None]) / temperature - log_z_t[:, None]
    p, q = log_p.exp(), log_q.exp()
    zero = torch.zeros_like(log_z_s)
    if name == "forward_kl":
        aux_s, aux_t = zero, (p * _masked_diff(p, log_p, log_q)).sum(-1)
    elif name == "reverse_kl":
        aux_s, aux_t = (q * _masked_diff(q, log_q, log_p)).sum(-1), zero
    else:
        log_m = _log_mixture(log_p, log_q, beta)
        aux_s = (q * _masked_diff(q, log_q, log_m)).sum(-1)
        aux_t = (p * _masked_diff(p, log_p, log_m)).sum(-1)
    return torch.stack([max_s, max_t, log_z_s, log_z_t, log_z_s1, aux_s, aux_t], dim=-1)


def _cap(softcap: float) -> float | None:
    return softcap if softcap > 0 else None


def kd_loss_fused(student: Tensor, teacher: Tensor, labels: Tensor | None, temperature: float,
                  alpha: float, divergence: int, beta: float, ignore_index: int, softcap: float,
                  reduction: int, student_requires_grad: bool,
                  teacher_requires_grad: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Reference of ``torch.ops.kdfast.kd_loss_fused``: (reduced loss, row statistics
    ``[N, 7]``, d loss / d student, d loss / d teacher), empty tensors for gradients
    not requested; ``softcap`` 0 means none, ``reduction`` indexes ``REDUCTIONS``."""
    name = DIVERGENCES[divergence]
    acc = _acc_dtype(student)
    vocab = student.shape[-1]
    s = student.detach().to(acc).requires_grad_(student_requires_grad)
    t = teacher.detach().to(acc).requires_grad_(teacher_requires_grad)
    with torch.enable_grad():
        rows = kd_loss_rows(s, t, labels, temperature, alpha, name, beta, ignore_index,
                            _cap(softcap))
        loss = reduce_rows(rows, labels, ignore_index, REDUCTIONS[reduction])
        wanted = [x for x, w in ((s, student_requires_grad), (t, teacher_requires_grad)) if w]
        grads = list(torch.autograd.grad(loss.sum(), wanted)) if wanted else []
    with torch.no_grad():
        cs = apply_softcap(s.detach().reshape(-1, vocab), _cap(softcap))
        ct = apply_softcap(t.detach().reshape(-1, vocab), _cap(softcap))
        stats = _stats(cs, ct, temperature, alpha, name, beta)
    grad_s = grads.pop(0).to(student.dtype) if student_requires_grad else student.new_empty(0)
    grad_t = grads.pop(0).to(teacher.dtype) if teacher_requires_grad else teacher.new_empty(0)
    return loss.detach(), stats, grad_s, grad_t


def kd_loss_backward(grad_loss: Tensor, student: Tensor, teacher: Tensor, labels: Tensor | None,
                     stats: Tensor, temperature: float, alpha: float, divergence: int, beta: float,
                     ignore_index: int, softcap: float, student_requires_grad: bool,
                     teacher_requires_grad: bool) -> tuple[Tensor, Tensor]:
    """Reference of ``torch.ops.kdfast.kd_loss_backward``: the closed-form gradients of
    ``docs/kd_loss_math.md`` scaled by ``grad_loss``; empty tensors where not requested."""
    name = DIVERGENCES[divergence]
    acc = _acc_dtype(student)
    vocab = student.shape[-1]
    cap = _cap(softcap)
    s = apply_softcap(student.reshape(-1, vocab).to(acc), cap)
    t = apply_softcap(teacher.reshape(-1, vocab).to(acc), cap)
    max_s, max_t, log_z_s, log_z_t, log_z_s1, aux_s, aux_t = (
        stats[:, i : i + 1].to(acc) for i in range(7))
    log_q = (s - max_s) / temperature - log_z_s
    log_p = (t - max_t) / temperature - log_z_t
    p, q = log_p.exp(), log_q.exp()
    c = (1.0 - alpha) * temperature
    w = grad_loss.reshape(-1, 1).to(acc)
    if name == "forward_kl":
        grad_s = c * (q - p)
        grad_t = c * p * (_masked_diff(p, log_p, log_q) - aux_t)
    elif name == "reverse_kl":
        grad_s = c * q * (_masked_diff(q, log_q, log_p) - aux_s)
        grad_t = c * (p - q)
    else:
        log_m = _log_mixture(log_p, log_q, beta)
        grad_s = c * (1.0 - beta) * q * (_masked_diff(q, log_q, log_m) - aux_s)
        grad_t = c * beta * p * (_masked_diff(p, log_p, log_m) - aux_t)
    if alpha > 0:
        q1 = torch.exp(s - max_s - log_z_s1)
        y = labels.reshape(-1)
        onehot = F.one_hot(torch.where(y == ignore_index, 0, y), vocab).to(acc)
        grad_s = grad_s + alpha * (q1 - onehot)
    if cap is not None:  # chain rule through the cap; 1 on masked entries
        grad_s = grad_s * torch.where(s == float("-inf"), 1.0, 1.0 - (s / cap) ** 2)
        grad_t = grad_t * torch.where(t == float("-inf"), 1.0, 1.0 - (t / cap) ** 2)
    grad_s, grad_t = grad_s * w, grad_t * w
    if labels is not None:
        # Ignored rows get exactly 0, even where their terms are NaN.
        counted = labels.reshape(-1, 1) != ignore_index
        grad_s = torch.where(counted, grad_s, 0.0)
        grad_t = torch.where(counted, grad_t, 0.0)
    empty = student.new_empty(0)
    out_s = grad_s.to(student.dtype).reshape(student.shape) if student_requires_grad else empty
    out_t = (grad_t.to(teacher.dtype).reshape(teacher.shape) if teacher_requires_grad
             else teacher.new_empty(0))
    return out_s, out_t


# --- feature_loss -------------------------------------------------------------------------


def feature_loss_rows(student: Tensor, teacher: Tensor, kind: str = "mse", normalize: bool = False,
                      mask: Tensor | None = None) -> Tensor:
    """Per-row loss of :func:`kdfast.feature_loss` (0 on unselected rows): the sum over
    ``D`` of the element-wise kinds, ``1 - cos`` for ``"cosine"``.

    Shapes: ``student``, ``teacher`` ``[..., D]``; ``mask`` bool ``[...]`` or None;
    returns ``[...]`` in float32 (float64 for float64 inputs). Differentiable; the
    cosine's norms are clamped with ``clamp_min`` (zero derivative below ``1e-8``).
    """
    acc = _acc_dtype(student)
    s, t = student.to(acc), teacher.to(acc)
    if mask is not None:
        # Zeroed unselected rows keep their NaN / inf out of the result and gradient.
        keep = mask.unsqueeze(-1)
        s, t = torch.where(keep, s, 0.0), torch.where(keep, t, 0.0)
    if normalize:
        s, t = F.normalize(s, dim=-1), F.normalize(t, dim=-1)
    if kind == "cosine":
        s_unit = s / torch.linalg.vector_norm(s, dim=-1, keepdim=True).clamp_min(1e-8)
        t_unit = t / torch.linalg.vector_norm(t, dim=-1, keepdim=True).clamp_min(1e-8)
        rows = 1.0 - (s_unit * t_unit).sum(-1)
    else:
        d = s - t
        if kind == "mse":
            rows = (d * d).sum(-1)
        elif kind == "l1":
            rows = d.abs().sum(-1)
        else:
            rows = F.smooth_l1_loss(s, t, reduction="none", beta=1.0).sum(-1)
    if mask is not None:
        rows = torch.where(mask, rows, 0.0)
    return rows


def feature_loss(student: Tensor, teacher: Tensor, *, kind: str = "mse", normalize: bool = False,
                 mask: Tensor | None = None, reduction: str = "mean") -> Tensor:
    """Reference :func:`kdfast.feature_loss`: same arguments, same result, plain PyTorch."""
    from kdfast._args import check_feature_options, check_feature_tensors, feature_mean_divisor

    check_feature_options(kind, normalize, reduction)
    check_feature_tensors(student, teacher, mask)
    rows = feature_loss_rows(student, teacher, kind, normalize, mask)
    if reduction == "none":
        return rows
    total = rows.sum()
    if reduction == "sum":
        return total
    return total / feature_mean_divisor(mask, rows.numel(), student.shape[-1], kind)


# --- dkd_loss (Decoupled Knowledge Distillation) -----------------------------------------


def _dkd_parts(x: Tensor, target: Tensor, temperature: float) -> tuple[Tensor, Tensor, Tensor]:
    """``(log b_1, log b_2, log p~)`` of ``[N, V]`` logits with a boolean one-hot target mask:
    the binary (target, rest) log-probabilities and the log-softmax over the non-target
    classes (``-inf`` at the target), at temperature ``T``, without forming ``1 - p_y``."""
    rest = x.masked_fill(target, float("-inf"))
    # Shift by the non-target maximum before scaling: (x - max) / T keeps large logits exact.
    shift = rest.amax(-1, keepdim=True).detach()
    scaled = (rest - shift) / temperature
    log_z = torch.logsumexp(scaled, -1, keepdim=True)
    odds = ((x - shift) / temperature).masked_fill(~target, 0.0).sum(-1, keepdim=True) - log_z
    zero = torch.zeros_like(odds)
    return -torch.logaddexp(-odds, zero), -torch.logaddexp(odds, zero), scaled - log_z


def dkd_loss_rows(student: Tensor, teacher: Tensor, labels: Tensor, alpha: float, beta: float,
                  temperature: float, ignore_index: int) -> Tensor:
    """Per-row DKD loss ``T^2 (alpha TCKD + beta NCKD)`` (0 on ignored rows).

    Shapes: ``student``, ``teacher`` ``[..., V]``; ``labels`` ``[...]`` int64; returns
    ``[...]`` in float32 (float64 for float64 inputs). Differentiable.
    """
    acc = _acc_dtype(student)
    vocab = student.shape[-1]
    y = labels.reshape(-1)
    counted = (y != ignore_index).unsqueeze(-1)
    # Zeroed ignored rows keep NaN / inf of unused rows out of the result and gradient.
    s = torch.where(counted, student.reshape(-1, vocab).to(acc), 0.0)
    t = torch.where(counted, teacher.reshape(-1, vocab).to(acc), 0.0)
    target = F.one_hot(torch.where(counted.squeeze(-1), y, 0), vocab).bool()
    s1, s2, log_qn = _dkd_parts(s, target, temperature)
    t1, t2, log_pn = _dkd_parts(t, target, temperature)
    b_t = torch.cat([t1, t2], -1)
    tckd = (b_t.exp() * _masked_diff(b_t.exp(), b_t, torch.cat([s1, s2], -1))).sum(-1)
    p = log_pn.exp()
    nckd = (p * _masked_diff(p, log_pn, log_qn)).sum(-1)
    rows = temperature**2 * ((alpha * tckd if alpha else 0.0) + (beta * nckd if beta else 0.0))
    rows = torch.where(counted.squeeze(-1), rows, 0.0)
    return rows.reshape(student.shape[:-1])


def dkd_loss(student_logits: Tensor, teacher_logits: Tensor, labels: Tensor, *,
             alpha: float = 1.0, beta: float = 8.0, temperature: float = 4.0,
             ignore_index: int = -100, reduction: str = "batchmean") -> Tensor:
    """Reference :func:`kdfast.dkd_loss`: same arguments, same result, plain PyTorch."""
    from kdfast.dkd import check_dkd_options, check_dkd_tensors

    check_dkd_options(alpha, beta, temperature, ignore_index, reduction)
    labels = check_dkd_tensors(student_logits, teacher_logits, labels)
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= student_logits.shape[-1]))
    if bool(bad.any()):
        raise ValueError(f"dkd_loss: labels must be in [0, {student_logits.shape[-1]}) or equal "
                         f"ignore_index ({ignore_index}), got {int(labels[bad][0])}")
    rows = dkd_loss_rows(student_logits, teacher_logits, labels, alpha, beta, temperature,
                         ignore_index)
    return reduce_rows(rows, labels, ignore_index, reduction)


# --- attention transfer -------------------------------------------------------------------


def attention_map(x: Tensor, p: float = 2.0) -> Tensor:
    """Normalised attention map of an ``[N, C, H, W]`` feature map: ``[N, H * W]``,
    ``F.normalize(mean_C |x|**p, dim=1)``, in float32 (float64 for float64 inputs)."""
    return F.normalize(x.to(_acc_dtype(x)).abs().pow(p).mean(1).flatten(1), dim=1)


def attention_transfer_loss(student_feat: FeatureMaps, teacher_feat: FeatureMaps, *,
                            p: float = 2.0) -> Tensor:
    """Reference :func:`kdfast.attention_transfer_loss`: same arguments, same result,
    plain PyTorch (the attention maps and their difference are materialised)."""
    p = check_at_p(p)
    pairs = feature_map_pairs(student_feat, teacher_feat)
    single = isinstance(student_feat, Tensor)
    total = None
    for i, (s, t) in enumerate(pairs):
        check_feature_maps(s, t, "" if single else f" (pair {i})")
        loss = (attention_map(s, p) - attention_map(t, p)).pow(2).mean()
        total = loss if total is None else total + loss
    return total


# --- sparse teacher: topk_logits, sample_logits, sparse_kd_loss ----------------------------

_ROW_CHUNK = 256  # rows per step of the references below, which sort or expand whole rows


def _rows2d(x: Tensor) -> Tensor:
    return x.reshape(-1, x.shape[-1])


def _log_softmax_t(x: Tensor, temperature: float) -> Tensor:
    """``log_softmax(x / T)`` of ``[N, V]`` rows in the accumulation dtype, shifted by the
    row max first (logits of 1e4 stay exact). Rows without a finite entry are NaN."""
    x = x.to(_acc_dtype(x))
    return F.log_softmax((x - x.amax(-1, keepdim=True)) / temperature, dim=-1)


def topk_logits(teacher_logits: Tensor, k: int, *, temperature: float = 1.0,
                index_dtype: torch.dtype = torch.int64) -> tuple[Tensor, Tensor]:
    """Reference :func:`kdfast.topk_logits`: a stable descending sort of each row (ties:
    lower index first, NaN first), and ``log_softmax(teacher_logits / T)`` gathered there;
    a row of only ``-inf`` logits has no distribution: logprobs ``-inf`` (zero gradient).
    Differentiable in ``teacher_logits``."""
    check_topk_args(teacher_logits, k, temperature, index_dtype)
    x = _rows2d(teacher_logits)
    indices, logprobs = [], []
    for start in range(0, x.shape[0], _ROW_CHUNK):
        rows = x[start:start + _ROW_CHUNK]
        order = torch.sort(rows.detach().to(_acc_dtype(rows)), dim=-1, descending=True,
                           stable=True).indices[:, :k]
        indices.append(order)
        empty = (rows == float("-inf")).all(-1, keepdim=True)
        lp = _log_softmax_t(torch.where(empty, 0.0, rows), temperature).gather(1, order)
        logprobs.append(torch.where(empty, float("-inf"), lp))
    lead = teacher_logits.shape[:-1]
    idx = torch.cat(indices).reshape(*lead, k).to(index_dtype) if indices else \
        x.new_empty((*lead, k), dtype=index_dtype)
    lp = torch.cat(logprobs).reshape(*lead, k) if logprobs else \
        x.new_empty((*lead, k), dtype=_acc_dtype(x))
    return idx, lp


def sample_logits(teacher_logits: Tensor, num_samples: int, *, temperature: float = 1.0,
                  generator: torch.Generator | None = None,
                  index_dtype: torch.dtype = torch.int64) -> tuple[Tensor, Tensor]:
    """Reference :func:`kdfast.sample_logits`: ``torch.multinomial`` with replacement, then
    the draws of each row counted. Same distribution as the kernel, not the same draws.
    Rows whose softmax is undefined (no finite logit, or NaN) are all padding."""
    check_sample_args(teacher_logits, num_samples, temperature, generator, index_dtype)
    x = _rows2d(teacher_logits.detach())
    lead = teacher_logits.shape[:-1]
    out_idx = torch.full((x.shape[0], num_samples), -1, dtype=torch.int64, device=x.device)
    out_cnt = torch.zeros((x.shape[0], num_samples), dtype=torch.int64, device=x.device)
    for start in range(0, x.shape[0], _ROW_CHUNK):
        probs = _log_softmax_t(x[start:start + _ROW_CHUNK], temperature).exp()
        defined = torch.isfinite(probs).all(-1) & (probs.sum(-1) > 0)
        probs = torch.where(defined.unsqueeze(-1), probs, 1.0)
        draws = torch.multinomial(probs, num_samples, replacement=True, generator=generator)
        draws = draws.sort(-1).values
        first = torch.ones_like(draws, dtype=torch.bool)
        first[:, 1:] = draws[:, 1:] != draws[:, :-1]
        slot = first.long().cumsum(-1) - 1  # output column of each draw
        idx = torch.full_like(draws, -1).scatter_(1, slot, draws)
        cnt = torch.zeros_like(draws).scatter_add_(1, slot, torch.ones_like(draws))
        out_idx[start:start + _ROW_CHUNK] = torch.where(defined.unsqueeze(-1), idx, -1)
        out_cnt[start:start + _ROW_CHUNK] = torch.where(defined.unsqueeze(-1), cnt, 0)
    probs = out_cnt.to(torch.float32) / num_samples
    return (out_idx.reshape(*lead, num_samples).to(index_dtype),
            probs.reshape(*lead, num_samples))


def sparse_kd_loss_rows(student: Tensor, teacher_indices: Tensor, teacher_values: Tensor,
                        labels: Tensor | None, values: str, temperature: float, tail: str,
                        alpha: float, ignore_index: int) -> Tensor:
    """Per-row :func:`kdfast.sparse_kd_loss` (0 on ignored rows), plain PyTorch with the
    student's full ``log_softmax`` and a dense support mask (the fused kernel never forms
    either). Shapes: ``student`` ``[..., V]``, teacher ``[..., K]``; returns ``[...]`` in
    float32 (float64 for float64 inputs). Differentiable in ``student``."""
    acc = _acc_dtype(student)
    s = _rows2d(student).to(acc)
    idx = _rows2d(teacher_indices).long()
    val = _rows2d(teacher_values).to(acc)
    y = None if labels is None else labels.reshape(-1)
    if y is not None:
        counted = (y != ignore_index).unsqueeze(-1)
        s = torch.where(counted, s, 0.0)
    valid = idx >= 0
    safe = torch.where(valid, idx, 0)
    log_q_all = _log_softmax_t(s, temperature)
    log_q = log_q_all.gather(1, safe)
    if values == "logprobs":
        p = torch.where(valid, val.exp(), 0.0)
        log_p = val
    else:
        p = torch.where(valid, val, 0.0)
        log_p = torch.where(p > 0, p, 1.0).log()
    mass = p.sum(-1)
    if tail == "renormalize":
        p_hat = torch.where(mass.unsqueeze(-1) > 0, p / mass.unsqueeze(-1), 0.0)
        log_p_hat = log_p - torch.where(mass > 0, mass, 1.0).log().unsqueeze(-1)
        kd = (p_hat * _masked_diff(p_hat, log_p_hat, log_q)).sum(-1)
    else:
        kd = (p * _masked_diff(p, log_p, log_q)).sum(-1)
        r_t = (1.0 - mass).clamp(min=0.0)
        # Counted, not scattered: padding entries point at index 0 as well, and scatter_
        # keeps an arbitrary one of the values sent to one index.
        hits = torch.zeros_like(s, dtype=torch.int64).scatter_add_(1, safe, valid.long())
        in_support = hits > 0
        r_s = torch.where(in_support, 0.0, log_q_all.exp()).sum(-1)
        log_r_s = r_s.clamp(min=torch.finfo(acc).tiny).log()
        log_r_t = torch.where(r_t > 0, r_t, 1.0).log()
        kd = kd + torch.where(r_t > 0, r_t * (log_r_t - log_r_s), 0.0)
    rows = kd * ((1.0 - alpha) * temperature**2)
    if alpha > 0:
        rows = rows + alpha * F.cross_entropy(s, y, ignore_index=ignore_index, reduction="none")
    if y is not None:
        rows = torch.where(counted.squeeze(-1), rows, 0.0)
    return rows.reshape(student.shape[:-1])


def sparse_kd_loss(student_logits: Tensor, teacher_indices: Tensor, teacher_values: Tensor,
                   labels: Tensor | None = None, *, values: str = "logprobs",
                   temperature: float = 1.0, tail: str = "renormalize", alpha: float = 0.0,
                   ignore_index: int = -100, reduction: str = "batchmean") -> Tensor:
    """Reference :func:`kdfast.sparse_kd_loss`: same arguments, same result, plain PyTorch."""
    check_sparse_kd_options(values, temperature, tail, alpha, ignore_index, reduction)
    labels = check_sparse_kd_tensors(student_logits, teacher_indices, teacher_values, labels,
                                     alpha)
    check_teacher_index_values(teacher_indices, student_logits.shape[-1])
    if labels is not None:
        check_label_values(labels, student_logits.shape[-1], ignore_index, "sparse_kd_loss")
    rows = sparse_kd_loss_rows(student_logits, teacher_indices, teacher_values.detach(), labels,
                               values, temperature, tail, alpha, ignore_index)
    return reduce_rows(rows, labels, ignore_index, reduction)
