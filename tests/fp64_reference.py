"""Independent float64 reference of ``kdfast.kd_loss`` for the tests.

Written straight from ``docs/kd_loss_math.md`` with plain PyTorch ops; it does not
import ``kdfast`` so a bug shared by the kernels and ``kdfast.reference`` cannot
hide. Gradients come from ``torch.autograd`` on this function.

Zero-weight terms (``p_j == 0`` or ``q_j == 0``, i.e. ``-inf`` logits) contribute 0 and
pass no NaN gradient: every log that may be ``-inf`` is replaced before it reaches an
op whose backward would turn ``0 * inf`` into NaN.

``softcap=c`` (Gemma-style logit soft-capping) replaces every logit ``x`` of both rows
by ``c * tanh(x / c)`` before the temperature; ``-inf`` stays ``-inf``; the hard-label
cross-entropy uses the capped student logits too.
"""

from __future__ import annotations

import math

import torch

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")


def soft_cap(x: torch.Tensor, softcap: float | None) -> torch.Tensor:
    """``softcap * tanh(x / softcap)`` with ``-inf`` kept (``None``: ``x`` unchanged).

    The ``-inf`` entries take a constant branch, so no gradient (and no NaN) flows
    through them; elsewhere the gradient is ``1 - tanh(x / softcap)**2`` from autograd.
    """
    if softcap is None:
        return x
    masked = x == -math.inf
    capped = softcap * torch.tanh(torch.where(masked, 0.0, x) / softcap)
    return torch.where(masked, -math.inf, capped)


def _weighted_log_ratio(w: torch.Tensor, log_w: torch.Tensor, log_v: torch.Tensor) -> torch.Tensor:
    """``sum_j w_j (log w_j - log v_j)`` over the last dim, terms with ``w_j == 0`` dropped."""
    keep = w > 0
    diff = torch.where(keep, log_w, 0.0) - torch.where(keep, log_v, 0.0)
    return torch.where(keep, w * diff, 0.0).sum(-1)


def _log_mixture(log_p: torch.Tensor, log_q: torch.Tensor, beta: float) -> torch.Tensor:
    """``log(beta p + (1 - beta) q)`` computed in log space; ``-inf`` where both are 0."""
    both_zero = (log_p == -math.inf) & (log_q == -math.inf)
    a = torch.where(both_zero, 0.0, log_p) + math.log(beta)
    b = torch.where(both_zero, 0.0, log_q) + math.log1p(-beta)
    return torch.where(both_zero, -math.inf, torch.logaddexp(a, b))


def divergence_rows(s: torch.Tensor, t: torch.Tensor, temperature: float, divergence: str,
                    beta: float) -> torch.Tensor:
    """``D`` per row of ``[R, V]`` float64 logits."""
    log_q = torch.log_softmax(s / temperature, dim=-1)
    log_p = torch.log_softmax(t / temperature, dim=-1)
    q, p = log_q.exp(), log_p.exp()
    if divergence == "forward_kl":
        return _weighted_log_ratio(p, log_p, log_q)
    if divergence == "reverse_kl":
        return _weighted_log_ratio(q, log_q, log_p)
    if divergence == "jsd":
        log_m = _log_mixture(log_p, log_q, beta)
        return (beta * _weighted_log_ratio(p, log_p, log_m)
                + (1.0 - beta) * _weighted_log_ratio(q, log_q, log_m))
    raise ValueError(divergence)


def ref_kd_loss_rows(student: torch.Tensor, teacher: torch.Tensor,
                     labels: torch.Tensor | None = None, *, temperature: float = 1.0,
                     alpha: float = 0.0, divergence: str = "forward_kl", beta: float = 0.5,
                     ignore_index: int = -100, softcap: float | None = None) -> torch.Tensor:
    """Per-row loss ``[...]`` in float64; ignored rows are exactly 0 (and pass no gradient)."""
    vocab = student.shape[-1]
    s = student.to(torch.float64).reshape(-1, vocab)
    t = teacher.to(torch.float64).reshape(-1, vocab)
    rows_shape = student.shape[:-1]
    if labels is None:
        counted = torch.ones(s.shape[0], dtype=torch.bool, device=s.device)
    else:
        counted = labels.reshape(-1) != ignore_index
    # Ignored rows may hold anything (NaN included): replace them before any math.
    s = torch.where(counted[:, None], s, 0.0)
    t = torch.where(counted[:, None], t, 0.0)
    s, t = soft_cap(s, softcap), soft_cap(t, softcap)
    rows = (1.0 - alpha) * temperature**2 * divergence_rows(s, t, temperature, divergence, beta)
    if alpha > 0:
        assert labels is not None
        y = torch.where(counted, labels.reshape(-1), 0)
        ce = torch.logsumexp(s, dim=-1) - s.gather(-1, y[:, None]).squeeze(-1)
        rows = rows + alpha * ce
    rows = torch.where(counted, rows, 0.0)
    return rows.reshape(rows_shape)


def ref_kd_loss(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor | None = None,
                *, temperature: float = 1.0, alpha: float = 0.0, divergence: str = "forward_kl",
                beta: float = 0.5, ignore_index: int = -100, reduction: str = "batchmean",
                softcap: float | None = None) -> torch.Tensor:
    """float64 ``kd_loss``: same arguments and reductions as the public API."""
    rows = ref_kd_loss_rows(student, teacher, labels, temperature=temperature, alpha=alpha,
                            divergence=divergence, beta=beta, ignore_index=ignore_index,
                            softcap=softcap)
    if reduction == "none":
        return rows
    total = rows.sum()
    if reduction == "sum":
        return total
    assert reduction == "batchmean", reduction
    if labels is None:
        count = rows.numel()
    else:
        count = int((labels != ignore_index).sum())
    return total / max(count, 1)


def ref_loss_and_grads(student: torch.Tensor, teacher: torch.Tensor,
                       labels: torch.Tensor | None = None, *, grad_output=None,
                       teacher_grad: bool = False, **options):
    """float64 (loss, grad_student, grad_teacher or None) of :func:`ref_kd_loss`.

    ``grad_output`` is the gradient of the returned loss (a scalar or a tensor of the
    loss's shape); the inputs' values are taken as they are (already rounded to
    their dtype), upcast exactly to float64.
    """
    s = student.detach().to(torch.float64).requires_grad_(True)
    t = teacher.detach().to(torch.float64).requires_grad_(teacher_grad)
    loss = ref_kd_loss(s, t, labels, **options)
    go = torch.ones_like(loss) if grad_output is None else torch.as_tensor(
        grad_output, dtype=torch.float64, device=loss.device).expand_as(loss)
    inputs = (s, t) if teacher_grad else (s,)
    grads = torch.autograd.grad(loss, inputs, go, allow_unused=True)
    grad_s = grads[0] if grads[0] is not None else torch.zeros_like(s)
    grad_t = None
    if teacher_grad:
        grad_t = grads[1] if grads[1] is not None else torch.zeros_like(t)
    return loss.detach(), grad_s, grad_t


def eager_kd_loss(student: torch.Tensor, teacher: torch.Tensor,
                  labels: torch.Tensor | None = None, *, temperature: float = 1.0,
                  alpha: float = 0.0, divergence: str = "forward_kl", beta: float = 0.5,
                  ignore_index: int = -100, reduction: str = "batchmean",
                  softcap: float | None = None) -> torch.Tensor:
    """The same loss computed the way eager PyTorch users do, in the inputs' own dtypes.

    Each log-softmax runs in its input's dtype and the divergence in the promoted
    dtype of the two, so its error against :func:`ref_kd_loss` is the yardstick of
    the tolerance rule in STYLE.md for low-precision inputs. ``softcap`` is applied
    in the inputs' dtypes too, as ``softcap * tanh(x / softcap)`` on the finite logits.
    """
    if softcap is not None:
        student, teacher = (
            torch.where(x == -math.inf, x, softcap * torch.tanh(x / softcap))
            for x in (student, teacher))
    # A masked (-inf) entry becomes the usual "very negative" finite fill, so that
    # p_j = 0 without 0 * (-inf) = NaN; finite even after dividing by temperature < 1.
    student, teacher = (
        x.masked_fill(x == -math.inf, torch.finfo(x.dtype).min / 2 * min(1.0, temperature))
        for x in (student, teacher))
    log_q = torch.log_softmax(student / temperature, dim=-1)
    log_p = torch.log_softmax(teacher / temperature, dim=-1)
    dtype = torch.promote_types(log_q.dtype, log_p.dtype)
    log_q, log_p = log_q.to(dtype), log_p.to(dtype)
    q, p = log_q.exp(), log_p.exp()
    if divergence == "forward_kl":
        d = (p * (log_p - log_q)).sum(-1)
    elif divergence == "reverse_kl":
        d = (q * (log_q - log_p)).sum(-1)
    else:
        # log m in log space, as careful eager code does: log(beta p + (1-beta) q) gives
        # 0 * (-inf) = NaN once both probabilities underflow in float16.
        log_m = torch.logaddexp(log_p + math.log(beta), log_q + math.log1p(-beta))
        d = beta * (p * (log_p - log_m)).sum(-1) + (1.0 - beta) * (q * (log_q - log_m)).sum(-1)
    rows = (1.0 - alpha) * temperature**2 * d
    if labels is not None:
        counted = labels != ignore_index
        if alpha > 0:
            ce = torch.nn.functional.cross_entropy(
                student.reshape(-1, student.shape[-1]), labels.reshape(-1),
                ignore_index=ignore_index, reduction="none").reshape(labels.shape)
            rows = rows + alpha * ce.to(rows.dtype)
        rows = torch.where(counted, rows, 0.0)
        count = max(int(counted.sum()), 1)
    else:
        count = max(rows.numel(), 1)
    if reduction == "none":
        return rows
    if reduction == "sum":
        return rows.sum()
    return rows.sum() / count
