"""Input builders and the tolerance rules of STYLE.md, shared by the kd_loss tests."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from fp64_reference import eager_kd_loss, ref_loss_and_grads

import kdfast

LOW_PRECISION = (torch.float16, torch.bfloat16)

# (student, teacher) dtype pairs the dtype tests run over.
DTYPE_PAIRS = [
    (torch.float32, torch.float32),
    (torch.bfloat16, torch.bfloat16),
    (torch.float16, torch.float16),
    (torch.bfloat16, torch.float32),
    (torch.float32, torch.bfloat16),
    (torch.float16, torch.float32),
    (torch.float32, torch.float16),
    (torch.bfloat16, torch.float16),
]


def pair_id(dtypes) -> str:
    """pytest id of a DTYPE_PAIRS entry, e.g. 'bfloat16-float32'."""
    return f"{dtypes[0]}-{dtypes[1]}".replace("torch.", "")


def logits(shape: Sequence[int], dtype=torch.float32, device="cpu", scale: float = 3.0,
           requires_grad: bool = False) -> torch.Tensor:
    x = (torch.randn(*shape, dtype=torch.float64) * scale).to(device=device, dtype=dtype)
    return x.requires_grad_(requires_grad)


def labels_for(rows_shape: Sequence[int], vocab: int, device="cpu", ignore_every: int = 3,
               ignore_index: int = -100) -> torch.Tensor:
    """Random labels with every ``ignore_every``-th row (flat order) ignored (0: none)."""
    y = torch.randint(0, vocab, tuple(rows_shape), dtype=torch.int64)
    if ignore_every:
        flat = y.view(-1)
        flat[1::ignore_every] = ignore_index
    return y.to(device)


def fp32_tolerances(temperature: float):
    """(rtol, atol) for a float32-kernel loss against the float64 reference.

    The loss is ``T**2 * D``; the kernel's rounding error sits on the log-ratio terms
    (size ``O(1)``), so the absolute error grows with ``T**2``.
    """
    return 1e-5, 1e-6 * max(1.0, temperature**2)


def assert_close_fp32(actual: torch.Tensor, expected: torch.Tensor, rtol: float, atol: float,
                      what: str = "") -> None:
    torch.testing.assert_close(actual.detach().to(torch.float64).cpu(), expected.cpu(),
                               rtol=rtol, atol=atol, equal_nan=True, msg=lambda m: f"{what}: {m}")


def assert_grad_close_fp32(actual: torch.Tensor, expected: torch.Tensor, what: str = "") -> None:
    """float32 gradients: relative to the gradient's own scale."""
    scale = float(expected.abs().max()) if expected.numel() else 0.0
    assert_close_fp32(actual, expected, rtol=1e-4, atol=1e-5 * max(scale, 1e-2), what=what)


def max_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    if ref.numel() == 0:
        return 0.0
    return float((x.detach().to(torch.float64).cpu() - ref.cpu()).abs().max())


def assert_within_eager_error(actual: torch.Tensor, ref: torch.Tensor, eager: torch.Tensor,
                              factor: float, what: str = "", floor: float = 1e-6) -> None:
    """STYLE.md rule: error vs float64 <= factor x eager-PyTorch error in the low dtype + floor."""
    assert actual.shape == ref.shape, (what, actual.shape, ref.shape)
    err = max_err(actual, ref)
    eager_err = max_err(eager, ref)
    scale = float(ref.abs().max()) if ref.numel() else 0.0
    bound = factor * eager_err + floor * max(1.0, scale)
    assert err <= bound, (f"{what}: kernel error {err:.3e} > {factor} x eager error "
                          f"{eager_err:.3e} + floor (bound {bound:.3e})")


def kernel_loss_and_grads(student: torch.Tensor, teacher: torch.Tensor,
                          labels: torch.Tensor | None, *, grad_output=None,
                          teacher_grad: bool = False, fn=None, **options):
    """(loss, grad_student, grad_teacher or None) of ``kdfast.kd_loss`` (or ``fn``)."""
    fn = kdfast.kd_loss if fn is None else fn
    s = student.detach().clone().requires_grad_(True)
    t = teacher.detach().clone().requires_grad_(teacher_grad)
    loss = fn(s, t, labels, **options)
    go = torch.ones_like(loss) if grad_output is None else grad_output
    loss.backward(go)
    return loss.detach(), s.grad, (t.grad if teacher_grad else None)


def eager_loss_and_grads(student, teacher, labels, *, grad_output=None, teacher_grad=False,
                         **options):
    return kernel_loss_and_grads(student, teacher, labels, grad_output=grad_output,
                                 teacher_grad=teacher_grad, fn=eager_kd_loss, **options)


def check_against_reference(student, teacher, labels=None, *, grad_output=None,
                            teacher_grad=False, eager_rule=False, fn=None, **options):
    """Runs kdfast.kd_loss (or ``fn``) forward + backward and checks loss and gradients against the
    float64 reference, with the tolerance rule for the inputs' dtypes.

    float32 / float64: tight rtol / atol. float16 / bfloat16 (either input): the float32
    tolerance on the loss and one rounding to the gradient's dtype (all math is float32),
    and the STYLE.md rule (error <= 2x, gradients 3x, eager PyTorch's error in the
    inputs' dtypes). ``eager_rule=True``: only the STYLE.md rule, for ill-conditioned
    cases where float32 itself is the limit. ``options`` are kd_loss's keyword arguments
    (``softcap`` included) and go to the kernel, the reference and the eager yardstick alike."""
    loss, gs, gt = kernel_loss_and_grads(student, teacher, labels, grad_output=grad_output,
                                         teacher_grad=teacher_grad, fn=fn, **options)
    go_ref = None if grad_output is None else grad_output.detach().to(torch.float64)
    ref_loss, ref_gs, ref_gt = ref_loss_and_grads(student, teacher, labels, grad_output=go_ref,
                                                  teacher_grad=teacher_grad, **options)
    # Contract: float32 result (float64 for float64 inputs), leading shape for "none".
    want_dtype = torch.float64 if student.dtype == torch.float64 else torch.float32
    assert loss.dtype == want_dtype, loss.dtype
    assert loss.shape == ref_loss.shape, (loss.shape, ref_loss.shape)
    assert gs.shape == student.shape and gs.dtype == student.dtype, (gs.shape, gs.dtype)
    if teacher_grad:
        assert gt is not None, "no gradient reached teacher_logits"
        assert gt.shape == teacher.shape and gt.dtype == teacher.dtype, (gt.shape, gt.dtype)
    low = student.dtype in LOW_PRECISION or teacher.dtype in LOW_PRECISION
    if eager_rule:
        e_loss, e_gs, e_gt = eager_loss_and_grads(student, teacher, labels,
                                                  grad_output=grad_output,
                                                  teacher_grad=teacher_grad, **options)
        assert_within_eager_error(loss, ref_loss, e_loss, 2.0, "loss")
        assert_within_eager_error(gs, ref_gs, e_gs, 3.0, "grad_student")
        if teacher_grad:
            assert_within_eager_error(gt, ref_gt, e_gt, 3.0, "grad_teacher")
        return loss, gs, gt
    if not low:
        rtol, atol = fp32_tolerances(options.get("temperature", 1.0))
        if student.dtype == torch.float64:
            rtol, atol = 1e-10, 1e-12
        assert_close_fp32(loss, ref_loss, rtol, atol, "loss")
        assert_grad_close_fp32(gs, ref_gs, "grad_student")
        if teacher_grad:
            assert_grad_close_fp32(gt, ref_gt, "grad_teacher")
        return loss, gs, gt
    # DESIGN.md: all math in float32 whatever the input dtype. The low-precision inputs
    # are exact in float64, so the loss must meet the float32 tolerance and each
    # gradient may differ only by its rounding to the gradient's dtype.
    rtol, atol = fp32_tolerances(options.get("temperature", 1.0))
    assert_close_fp32(loss, ref_loss, rtol, atol, "loss (float32 math)")
    for name, g, ref_g in (("grad_student", gs, ref_gs), ("grad_teacher", gt, ref_gt)):
        if g is None:
            continue
        scale = float(ref_g.abs().max()) if ref_g.numel() else 0.0
        assert_close_fp32(g, ref_g, rtol=torch.finfo(g.dtype).eps,
                          atol=1e-5 * max(scale, 1e-2), what=f"{name} (float32 math)")
    e_loss, e_gs, e_gt = eager_loss_and_grads(student, teacher, labels, grad_output=grad_output,
                                              teacher_grad=teacher_grad, **options)
    assert_within_eager_error(loss, ref_loss, e_loss, 2.0, "loss")
    assert_within_eager_error(gs, ref_gs, e_gs, 3.0, "grad_student")
    if teacher_grad:
        assert_within_eager_error(gt, ref_gt, e_gt, 3.0, "grad_teacher")
    return loss, gs, gt
