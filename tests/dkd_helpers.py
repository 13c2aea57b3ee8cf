"""Independent float64 references of ``kdfast.dkd_loss`` for the tests, and the checks
built on them.

``ref_dkd_rows`` is written from the formula of Decoupled Knowledge Distillation
(Zhao et al., CVPR 2022) with plain PyTorch ops and does not import ``kdfast``:
``log p = log_softmax(t / T)`` over all classes; the binary distribution is
``(p_y, sum_{j != y} p_j)`` taken in log space (``logsumexp`` of the non-target
log-probabilities); the non-target distribution is ``log_softmax`` of the logits with the
target filled with ``-inf``. Gradients come from ``torch.autograd`` on it.

``published_dkd`` is the formulation found in most DKD code: target / non-target masses
as sums of masked softmax probabilities, and the non-target softmax taken by subtracting
a large offset (1000) from the target logit. It agrees with the exact one on ordinary
inputs and serves as a cross-check of the definition.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from kd_helpers import DTYPE_PAIRS as KD_DTYPE_PAIRS
from kd_helpers import LOW_PRECISION, pair_id  # noqa: F401  (re-exported to the dkd tests)

import kdfast

REDUCTIONS = ("batchmean", "sum", "none")

# (student, teacher) dtype pairs: kd_loss's, and float16 against bfloat16.
DTYPE_PAIRS = [*KD_DTYPE_PAIRS, (torch.float16, torch.bfloat16)]


def _kl_terms(log_w: torch.Tensor, log_v: torch.Tensor) -> torch.Tensor:
    """``sum_j w_j (log w_j - log v_j)`` over the last dim; terms with ``w_j == 0`` dropped
    (and no NaN gradient through them)."""
    keep = log_w > -math.inf
    w = torch.where(keep, log_w, -math.inf).exp()
    diff = torch.where(keep, log_w, 0.0) - torch.where(keep, log_v, 0.0)
    return torch.where(keep, w * diff, 0.0).sum(-1)


def ref_dkd_rows(student, teacher, labels, *, alpha=1.0, beta=8.0, temperature=4.0,
                 ignore_index=-100):
    """Per-row DKD loss in float64, ``[...]``; 0 on ignored rows. Differentiable."""
    vocab = student.shape[-1]
    s = student.reshape(-1, vocab).to(torch.float64)
    t = teacher.reshape(-1, vocab).to(torch.float64)
    y = labels.reshape(-1).to(torch.int64)
    counted = y != ignore_index
    s = torch.where(counted[:, None], s, 0.0)
    t = torch.where(counted[:, None], t, 0.0)
    y = torch.where(counted, y, 0)
    target = F.one_hot(y, vocab).bool()

    def binary_and_rest(x):
        log_p = torch.log_softmax(x / temperature, dim=-1)
        log_b1 = log_p.gather(-1, y[:, None])
        log_b2 = torch.logsumexp(log_p.masked_fill(target, -math.inf), -1, keepdim=True)
        log_rest = torch.log_softmax((x / temperature).masked_fill(target, -math.inf), dim=-1)
        return torch.cat([log_b1, log_b2], -1), log_rest

    log_bs, log_qs = binary_and_rest(s)
    log_bt, log_pt = binary_and_rest(t)
    tckd = _kl_terms(log_bt, log_bs)
    nckd = _kl_terms(log_pt, log_qs)
    rows = temperature**2 * (alpha * tckd + beta * nckd)
    rows = torch.where(counted, rows, 0.0)
    return rows.reshape(student.shape[:-1])


def ref_dkd(student, teacher, labels, *, reduction="batchmean", **options):
    rows = ref_dkd_rows(student, teacher, labels, **options)
    if reduction == "none":
        return rows
    if reduction == "sum":
        return rows.sum()
    counted = int((labels != options.get("ignore_index", -100)).sum())
    return rows.sum() / max(counted, 1)


def published_dkd(student, teacher, labels, *, alpha=1.0, beta=8.0, temperature=4.0):
    """The common DKD formulation (batchmean over all rows; no ignored rows), float64."""
    s, t = student.to(torch.float64), teacher.to(torch.float64)
    n = s.shape[0]
    target = F.one_hot(labels, s.shape[-1]).to(torch.float64)

    def masses(x):
        prob = torch.softmax(x / temperature, dim=1)
        return torch.stack([(prob * target).sum(1), (prob * (1 - target)).sum(1)], dim=1)

    b_s, b_t = masses(s), masses(t)
    tckd = (b_t * (b_t.log() - b_s.log())).sum() * temperature**2 / n
    p_rest = torch.softmax(t / temperature - 1000.0 * target, dim=1)
    log_q_rest = torch.log_softmax(s / temperature - 1000.0 * target, dim=1)
    log_p_rest = torch.log_softmax(t / temperature - 1000.0 * target, dim=1)
    nckd = (p_rest * (log_p_rest - log_q_rest)).sum() * temperature**2 / n
    return alpha * tckd + beta * nckd


def logits(shape, dtype=torch.float32, device="cpu", scale=3.0):
    return (torch.randn(*shape, dtype=torch.float64) * scale).to(device=device, dtype=dtype)


def labels_for(rows_shape, vocab, device="cpu", ignore_every=3, ignore_index=-100):
    """Random labels, every ``ignore_every``-th row (flat order) ignored (0: none)."""
    y = torch.randint(0, vocab, tuple(rows_shape), dtype=torch.int64)
    if ignore_every:
        y.view(-1)[1::ignore_every] = ignore_index
    return y.to(device)


def run_dkd(student, teacher, labels, *, grad_output=None, teacher_grad=False, fn=None,
            **options):
    """(loss, grad_student, grad_teacher or None) of ``kdfast.dkd_loss`` (or ``fn``)."""
    fn = kdfast.dkd_loss if fn is None else fn
    s = student.detach().clone().requires_grad_(True)
    t = teacher.detach().clone().requires_grad_(teacher_grad)
    loss = fn(s, t, labels, **options)
    go = torch.ones_like(loss) if grad_output is None else grad_output
    loss.backward(go)
    return loss.detach(), s.grad, (t.grad if teacher_grad else None)


def ref_dkd_and_grads(student, teacher, labels, *, grad_output=None, teacher_grad=False,
                      **options):
    """float64 (loss, grad_student, grad_teacher or None) of the reference."""
    s = student.detach().cpu().to(torch.float64).requires_grad_(True)
    t = teacher.detach().cpu().to(torch.float64).requires_grad_(teacher_grad)
    loss = ref_dkd(s, t, labels.cpu(), **options)
    go = torch.ones_like(loss) if grad_output is None else grad_output.detach().cpu().double()
    wanted = [s, t] if teacher_grad else [s]
    grads = torch.autograd.grad(loss, wanted, go)
    return loss.detach(), grads[0], (grads[1] if teacher_grad else None)


def _max_err(x, ref):
    if ref.numel() == 0:
        return 0.0
    return float((x.detach().cpu().to(torch.float64) - ref).abs().max())


def _close(actual, expected, rtol, atol, what):
    torch.testing.assert_close(actual.detach().cpu().to(torch.float64), expected, rtol=rtol,
                               atol=atol, equal_nan=True, msg=lambda m: f"{what}: {m}")


def eager_low_precision(student, teacher, labels, *, grad_output=None, teacher_grad=False,
                        **options):
    """The reference formula run by eager PyTorch in the inputs' own dtypes (the
    yardstick of the low-precision tolerance rule)."""
    def fn(s, t, y, reduction="batchmean", **opts):
        dtype = s.dtype if s.dtype == t.dtype else torch.float32
        rows = _ref_rows_in_dtype(s.to(dtype), t.to(dtype), y, **opts)
        if reduction == "none":
            return rows.reshape(s.shape[:-1])
        if reduction == "sum":
            return rows.sum()
        return rows.sum() / max(int((y != opts.get("ignore_index", -100)).sum()), 1)

    return run_dkd(student, teacher, labels, grad_output=grad_output, teacher_grad=teacher_grad,
                   fn=fn, **options)


def _ref_rows_in_dtype(s, t, labels, *, alpha=1.0, beta=8.0, temperature=4.0, ignore_index=-100):
    vocab = s.shape[-1]
    s, t = s.reshape(-1, vocab), t.reshape(-1, vocab)
    y = labels.reshape(-1)
    counted = y != ignore_index
    y = torch.where(counted, y, 0)
    target = F.one_hot(y, vocab).bool()

    def parts(x):
        log_p = torch.log_softmax(x / temperature, dim=-1)
        log_b = torch.cat([log_p.gather(-1, y[:, None]),
                           torch.logsumexp(log_p.masked_fill(target, -math.inf), -1, keepdim=True)], -1)
        return log_b, torch.log_softmax((x / temperature).masked_fill(target, -math.inf), dim=-1)

    log_bs, log_qs = parts(s)
    log_bt, log_pt = parts(t)
    rows = temperature**2 * (alpha * _kl_terms(log_bt, log_bs) + beta * _kl_terms(log_pt, log_qs))
    return torch.where(counted, rows, 0.0)


def _within_eager_error(name, x, ref, eager, factor):
    scale = float(ref.abs().max()) if ref.numel() else 0.0
    bound = factor * _max_err(eager, ref) + 1e-6 * max(1.0, scale)
    assert _max_err(x, ref) <= bound, (f"{name}: error {_max_err(x, ref):.3e} > {factor} x eager "
                                       f"error {_max_err(eager, ref):.3e} + floor")


def check_dkd(student, teacher, labels, *, grad_output=None, teacher_grad=False, fn=None,
              eager_rule=False, **options):
    """Runs ``kdfast.dkd_loss`` (or ``fn``) forward + backward and checks the loss and
    gradients against the float64 reference.

    float32 / float64 inputs: tight tolerances (the loss is ``T^2`` times ``O(1)`` log
    terms). float16 / bfloat16 (either input): all math is float32, so the loss meets the
    float32 tolerance and each gradient differs from the reference by its rounding to the
    gradient's dtype at most, and the error is within 2x (gradients 3x) of eager
    PyTorch's in those dtypes. ``eager_rule=True``: only that last rule (against eager
    PyTorch in the inputs' dtypes, float32 included), for ill-conditioned cases where
    float32 itself is the limit."""
    loss, gs, gt = run_dkd(student, teacher, labels, grad_output=grad_output,
                           teacher_grad=teacher_grad, fn=fn, **options)
    ref_loss, ref_gs, ref_gt = ref_dkd_and_grads(student, teacher, labels,
                                                 grad_output=grad_output,
                                                 teacher_grad=teacher_grad, **options)
    want = torch.float64 if student.dtype == torch.float64 else torch.float32
    assert loss.dtype == want, loss.dtype
    assert loss.shape == ref_loss.shape, (loss.shape, ref_loss.shape)
    assert gs.shape == student.shape and gs.dtype == student.dtype, (gs.shape, gs.dtype)
    if teacher_grad:
        assert gt is not None and gt.shape == teacher.shape and gt.dtype == teacher.dtype
    low = student.dtype in LOW_PRECISION or teacher.dtype in LOW_PRECISION
    if eager_rule or low:
        e_loss, e_gs, e_gt = eager_low_precision(student, teacher, labels,
                                                 grad_output=grad_output,
                                                 teacher_grad=teacher_grad, **options)
        _within_eager_error("loss", loss, ref_loss, e_loss, 2.0)
        _within_eager_error("grad_student", gs, ref_gs, e_gs, 3.0)
        if teacher_grad:
            _within_eager_error("grad_teacher", gt, ref_gt, e_gt, 3.0)
        if eager_rule:
            return loss, gs, gt
    temperature = options.get("temperature", 4.0)
    weight = max(1.0, temperature**2) * max(1.0, options.get("alpha", 1.0) + options.get("beta", 8.0))
    if student.dtype == torch.float64:
        rtol, atol = 1e-9, 1e-11 * weight
    else:
        rtol, atol = 2e-5, 2e-6 * weight
    _close(loss, ref_loss, rtol, atol, "loss")
    for name, g, ref_g in (("grad_student", gs, ref_gs), ("grad_teacher", gt, ref_gt)):
        if g is None:
            continue
        scale = float(ref_g.abs().max()) if ref_g.numel() else 0.0
        if g.dtype == torch.float64:
            _close(g, ref_g, 1e-8, 1e-10 * max(scale, 1e-2), name)
        elif g.dtype in LOW_PRECISION:
            _close(g, ref_g, torch.finfo(g.dtype).eps, 2e-5 * max(scale, 1e-2), name)
        else:
            _close(g, ref_g, 1e-4, 2e-5 * max(scale, 1e-2), name)
    return loss, gs, gt
