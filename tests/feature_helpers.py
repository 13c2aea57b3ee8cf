"""An independent float64 reference of ``kdfast.feature_loss`` written from the formulas
with plain torch ops (``F.normalize``, ``F.cosine_similarity``, ``F.mse_loss`` /
``F.l1_loss`` / ``F.smooth_l1_loss`` with ``reduction="none"``, then masking and
reducing), and the checks of the feature_loss tests against it."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

import kdfast

KINDS = ("mse", "l1", "smooth_l1", "cosine")
REDUCTIONS = ("mean", "sum", "none")
LOW_PRECISION = (torch.float16, torch.bfloat16)

_ELEMENT_LOSSES = {"mse": F.mse_loss, "l1": F.l1_loss, "smooth_l1": F.smooth_l1_loss}


def ref_feature_loss(student: torch.Tensor, teacher: torch.Tensor, *, kind: str = "mse",
                     normalize: bool = False, mask: torch.Tensor | None = None,
                     reduction: str = "mean") -> torch.Tensor:
    """The loss in float64 from torch's own functions; differentiable."""
    s, t = student.double(), teacher.double()
    if mask is not None:  # unselected rows are no part of the loss, whatever they hold (NaN)
        keep = mask.unsqueeze(-1)
        s, t = torch.where(keep, s, 0.0), torch.where(keep, t, 0.0)
    if normalize:
        s, t = F.normalize(s, dim=-1), F.normalize(t, dim=-1)
    if kind == "cosine":
        rows = 1.0 - F.cosine_similarity(s, t, dim=-1)
        per_row = 1
    else:
        rows = _ELEMENT_LOSSES[kind](s, t, reduction="none").sum(-1)
        per_row = s.shape[-1]
    if mask is not None:
        rows = torch.where(mask, rows, torch.zeros_like(rows))
    if reduction == "none":
        return rows
    if reduction == "sum":
        return rows.sum()
    selected = rows.numel() if mask is None else int(mask.sum())
    if selected == 0:
        return rows.sum() * 0.0
    return rows.sum() / (selected * per_row)


def ref_loss_and_grads(student, teacher, *, grad_output=None, teacher_grad=True, **options):
    """(loss, d/d student, d/d teacher or None) of the float64 reference."""
    s = student.detach().double().requires_grad_(True)
    t = teacher.detach().double().requires_grad_(teacher_grad)
    loss = ref_feature_loss(s, t, **options)
    go = torch.ones_like(loss) if grad_output is None else grad_output.double().expand(loss.shape)
    wanted = [s, t] if teacher_grad else [s]
    grads = torch.autograd.grad(loss, wanted, go, allow_unused=True)
    grads = [torch.zeros_like(x) if g is None else g for x, g in zip(wanted, grads)]
    return loss.detach(), grads[0], (grads[1] if teacher_grad else None)


def features(shape, dtype=torch.float32, device="cpu", scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(*shape, dtype=torch.float64) * scale).to(device=device, dtype=dtype)


def random_mask(rows_shape, device="cpu", every: int = 3) -> torch.Tensor:
    """Every ``every``-th row (flat order) unselected."""
    mask = torch.ones(tuple(rows_shape), dtype=torch.bool)
    mask.view(-1)[1::every] = False
    return mask.to(device)


def _close(actual, expected, rtol, atol, what):
    torch.testing.assert_close(actual.detach().double().cpu(), expected.detach().double().cpu(),
                               rtol=rtol, atol=atol, equal_nan=True, msg=lambda m: f"{what}: {m}")


def assert_loss_close(loss, ref, dtype, what="loss"):
    """float32 math (float64 for float64 inputs) against the float64 reference."""
    ref = ref.detach()
    scale = float(ref.abs().max()) if ref.numel() else 0.0
    if dtype == torch.float64:
        _close(loss, ref, 1e-10, 1e-12 * max(1.0, scale), what)
    else:
        _close(loss, ref, 1e-5, 1e-6 * max(1.0, scale), what)


def assert_grad_close(grad, ref, what="grad", per_row: bool = False):
    """A gradient against the float64 reference: float32 math relative to the gradient's
    scale (each row's own scale with ``per_row``), plus one rounding to its dtype."""
    if ref.numel() == 0:
        assert grad.shape == ref.shape, (what, grad.shape, ref.shape)
        return
    if per_row:
        scale = ref.abs().amax(-1, keepdim=True).clamp_min(1e-2)
    else:
        scale = torch.tensor(max(float(ref.abs().max()), 1e-2), dtype=torch.float64)
    if grad.dtype == torch.float64:
        rtol, atol_rel = 1e-9, 1e-11
    elif grad.dtype in LOW_PRECISION:
        rtol, atol_rel = torch.finfo(grad.dtype).eps, 1e-5
    else:
        rtol, atol_rel = 1e-4, 1e-5
    g = grad.detach().double().cpu()
    r = ref.detach().double().cpu()
    bound = atol_rel * scale.cpu() + rtol * r.abs()
    err = (g - r).abs()
    bad = ~(err <= bound) & ~(g.isnan() & r.isnan())
    assert not bool(bad.any()), (f"{what}: {int(bad.sum())} of {g.numel()} elements off, max error "
                                 f"{float(err[bad].max()):.3e}, e.g. {g[bad][:4].tolist()} vs "
                                 f"{r[bad][:4].tolist()}")


def check_feature(student, teacher, *, grad_output=None, teacher_grad=True, per_row=False, fn=None,
                  **options):
    """Runs ``kdfast.feature_loss`` (or ``fn``) forward + backward on ``student`` / ``teacher``
    (their own layouts: views are kept) and checks loss and gradients against the float64
    reference. Returns (loss, grad_student, grad_teacher)."""
    fn = kdfast.feature_loss if fn is None else fn
    s = student.detach().requires_grad_(True)
    t = teacher.detach().requires_grad_(teacher_grad)
    loss = fn(s, t, **options)
    go = torch.ones_like(loss) if grad_output is None else grad_output.to(loss.device)
    loss.backward(go.expand(loss.shape))
    ref, ref_gs, ref_gt = ref_loss_and_grads(student, teacher, grad_output=grad_output,
                                             teacher_grad=teacher_grad, **options)
    want = torch.float64 if student.dtype == torch.float64 else torch.float32
    assert loss.dtype == want, loss.dtype
    assert loss.shape == ref.shape, (loss.shape, ref.shape)
    assert_loss_close(loss, ref, student.dtype)
    assert s.grad is not None and s.grad.shape == student.shape and s.grad.dtype == student.dtype
    assert_grad_close(s.grad, ref_gs, "grad_student", per_row)
    if teacher_grad:
        assert t.grad is not None and t.grad.shape == teacher.shape and t.grad.dtype == teacher.dtype
        assert_grad_close(t.grad, ref_gt, "grad_teacher", per_row)
    return loss.detach(), s.grad, t.grad


def check_views(base_s: torch.Tensor, base_t: torch.Tensor,
                make: Callable[[torch.Tensor, torch.Tensor], tuple], **options):
    """feature_loss of views ``make(base_s, base_t)`` (slices, transposes, expands): the
    gradients reaching the bases through autograd against the float64 reference's."""
    bs = base_s.detach().clone().requires_grad_(True)
    bt = base_t.detach().clone().requires_grad_(True)
    s, t = make(bs, bt)
    loss = kdfast.feature_loss(s, t, **options)
    loss.backward(torch.ones_like(loss))
    rs = base_s.detach().double().requires_grad_(True)
    rt = base_t.detach().double().requires_grad_(True)
    s64, t64 = make(rs, rt)
    ref = ref_feature_loss(s64, t64, **options)
    ref.backward(torch.ones_like(ref))
    assert_loss_close(loss, ref, base_s.dtype)
    assert_grad_close(bs.grad, rs.grad, "grad of the student's base")
    assert_grad_close(bt.grad, rt.grad, "grad of the teacher's base")


def run_isa_cases(device="cpu") -> None:
    """Every kind x normalize, tails and vector-width crossings, every dtype pair, masks and
    zero rows; used by the instruction-set test in a subprocess per kernel build."""
    pairs = [(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
             (torch.float16, torch.bfloat16), (torch.float32, torch.float16),
             (torch.float64, torch.float64)]
    dims = (1, 3, 17, 33, 300, 4101)
    i = 0
    for kind in KINDS:
        for normalize in (False, True):
            for dim in dims:
                if dim == 1 and (normalize or kind == "cosine"):
                    continue  # the loss depends on signs only (test_feature_loss.py checks D = 1)
                s_dtype, t_dtype = pairs[i % len(pairs)]
                reduction = REDUCTIONS[i % 3]
                i += 1
                rows = (3, 2) if dim < 4000 else (2,)
                s = features((*rows, dim), s_dtype, device)
                t = features((*rows, dim), t_dtype, device)
                mask = random_mask(rows, device) if i % 2 else None
                check_feature(s, t, kind=kind, normalize=normalize, mask=mask, reduction=reduction)
                if dim in (3, 17):  # zero vectors (gradients up to 1e20: no float16), own scale per row
                    s, t = (x.float() if x.dtype == torch.float16 else x for x in (s, t))
                    s[0, 0] = 0
                    t[0, 1] = 0
                    s[1, 1] = 0
                    t[1, 1] = 0
                    check_feature(s, t, kind=kind, normalize=normalize, reduction="none", per_row=True)
                # the float16 student's gradient is recomputed by the backward op
                if s_dtype == torch.float32 and dim == 33:
                    check_feature(s.half(), t, kind=kind, normalize=normalize, mask=mask,
                                  reduction=reduction)
