"""Logit soft-capping (``softcap=c``: every logit ``x`` of student and teacher becomes
``c * tanh(x / c)`` before the temperature, ``-inf`` stays ``-inf``, the hard-label term
uses the capped student logits) against the independent float64 reference: the
divergence x temperature x alpha grid, shapes, dtypes, layouts, teacher gradients,
gradcheck, torch.compile, masked vocabulary, and the argument checks."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from fp64_reference import ref_kd_loss, ref_kd_loss_rows, ref_loss_and_grads, soft_cap
from kd_helpers import (
    DTYPE_PAIRS,
    assert_close_fp32,
    assert_grad_close_fp32,
    check_against_reference,
    fp32_tolerances,
    labels_for,
    logits,
    pair_id,
)

import kdfast

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")
REDUCTIONS = ("batchmean", "sum", "none")
CAPS = (5.0, 30.0)
INF = math.inf
ERRORS = (ValueError, TypeError, RuntimeError)


def _scale_for(cap: float) -> float:
    """Logit scale at which the cap bends most logits (|x| ~ cap and beyond)."""
    return 2.0 * cap if cap < 20 else 40.0


# ----------------------------------------------------------------------------- the reference itself


def test_reference_softcap_formula():
    """The reference caps both inputs, then computes the usual loss (checked via kl_div)."""
    g = torch.Generator().manual_seed(3)
    s = torch.randn(5, 23, dtype=torch.float64, generator=g) * 20
    t = torch.randn(5, 23, dtype=torch.float64, generator=g) * 20
    cap, temperature = 5.0, 2.0
    s_c, t_c = cap * torch.tanh(s / cap), cap * torch.tanh(t / cap)
    log_q = F.log_softmax(s_c / temperature, -1)
    log_p = F.log_softmax(t_c / temperature, -1)
    expected = F.kl_div(log_q, log_p, log_target=True, reduction="batchmean") * temperature**2
    got = ref_kd_loss(s, t, temperature=temperature, softcap=cap)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=0)
    y = torch.tensor([1, -100, 4, 22, 0])
    rows = ref_kd_loss_rows(s, t, y, temperature=temperature, alpha=1.0, softcap=cap)
    ce = F.cross_entropy(s_c, y, reduction="none")
    torch.testing.assert_close(rows, ce, rtol=1e-12, atol=1e-14)
    # The cap really changes the loss at this scale.
    assert abs(float(got) - float(ref_kd_loss(s, t, temperature=temperature))) > 1.0


def test_reference_huge_softcap_is_no_softcap():
    s, t = logits((4, 19), dtype=torch.float64), logits((4, 19), dtype=torch.float64)
    y = labels_for((4,), 19)
    for div in DIVERGENCES:
        a = ref_kd_loss_rows(s, t, y, temperature=2.0, alpha=0.3, divergence=div, softcap=1e7)
        b = ref_kd_loss_rows(s, t, y, temperature=2.0, alpha=0.3, divergence=div)
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_reference_softcap_keeps_minus_inf_and_nan():
    x = torch.tensor([-INF, -1e4, -3.0, 0.0, 2.0, 1e4, math.nan], dtype=torch.float64)
    y = soft_cap(x, 5.0)
    assert y[0] == -INF and math.isnan(float(y[-1]))
    torch.testing.assert_close(y[1:-1], 5.0 * torch.tanh(x[1:-1] / 5.0), rtol=0, atol=0)
    assert soft_cap(x, None) is x


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_reference_gradient_is_chain_rule(divergence):
    """grad w.r.t. raw logits = grad w.r.t. capped logits * (1 - tanh(x / c)**2)."""
    s, t = logits((4, 11), dtype=torch.float64, scale=8), logits((4, 11), dtype=torch.float64,
                                                                  scale=8)
    y = torch.tensor([3, -100, 0, 10])
    cap = 4.0
    opts = dict(temperature=2.0, alpha=0.3, divergence=divergence, beta=0.3)
    _, gs, gt = ref_loss_and_grads(s, t, y, teacher_grad=True, softcap=cap, **opts)
    _, gs_c, gt_c = ref_loss_and_grads(soft_cap(s, cap), soft_cap(t, cap), y, teacher_grad=True,
                                       **opts)
    torch.testing.assert_close(gs, gs_c * (1 - torch.tanh(s / cap) ** 2), rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(gt, gt_c * (1 - torch.tanh(t / cap) ** 2), rtol=1e-10, atol=1e-14)


def test_reference_gradcheck_with_softcap():
    s = logits((3, 6), dtype=torch.float64, scale=6, requires_grad=True)
    t = logits((3, 6), dtype=torch.float64, scale=6, requires_grad=True)
    y = torch.tensor([1, -100, 5])
    for div in DIVERGENCES:
        assert torch.autograd.gradcheck(
            lambda a, b, d=div: ref_kd_loss(a, b, y, temperature=1.5, alpha=0.3, divergence=d,
                                            softcap=3.0, reduction="none"), (s, t))


# ----------------------------------------------------------------------------- the kernels


@pytest.mark.parametrize("cap", CAPS, ids=lambda c: f"cap{c:g}")
@pytest.mark.parametrize("alpha", (0.0, 0.3), ids=lambda a: f"alpha{a:g}")
@pytest.mark.parametrize("temperature", (0.5, 1.0, 2.0, 4.0), ids=lambda t: f"T{t:g}")
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_softcap_grid(device, divergence, temperature, alpha, cap):
    scale = _scale_for(cap)
    student = logits((6, 37), device=device, scale=scale)
    teacher = logits((6, 37), device=device, scale=scale)
    labels = labels_for((6,), 37, device=device)  # rows 1 and 4 ignored
    go = torch.randn(6, device=device)
    beta = 0.3 if divergence == "jsd" else 0.5
    loss, gs, gt = check_against_reference(
        student, teacher, labels, grad_output=go, teacher_grad=True, temperature=temperature,
        alpha=alpha, divergence=divergence, beta=beta, reduction="none", softcap=cap)
    assert torch.all(loss[labels == -100] == 0)
    assert torch.all(gs[labels == -100] == 0) and torch.all(gt[labels == -100] == 0)
    # The cap matters at this scale: the uncapped loss is different.
    plain = kdfast.kd_loss(student, teacher, labels, temperature=temperature, alpha=alpha,
                           divergence=divergence, beta=beta, reduction="none")
    assert (plain - loss).abs().max() > 1e-2


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_softcap_reductions(device, divergence, reduction):
    student = logits((9, 53), device=device, scale=15)
    teacher = logits((9, 53), device=device, scale=15)
    labels = labels_for((9,), 53, device=device, ignore_every=4)
    go = torch.randn(9, device=device) if reduction == "none" else None
    check_against_reference(student, teacher, labels, grad_output=go, temperature=2.0, alpha=0.3,
                            divergence=divergence, reduction=reduction, softcap=5.0)


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_softcap_without_labels(device, divergence):
    student, teacher = logits((5, 29), device=device, scale=20), logits((5, 29), device=device,
                                                                        scale=20)
    check_against_reference(student, teacher, None, teacher_grad=True, temperature=1.0,
                            divergence=divergence, softcap=10.0)


@pytest.mark.parametrize("shape", [(37,), (1, 1), (1, 37), (5, 1), (4, 5, 33), (2, 3, 4, 17),
                                   (7, 3, 1031)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_softcap_shapes(device, shape, divergence):
    student = logits(shape, device=device, scale=30)
    teacher = logits(shape, device=device, scale=30)
    labels = labels_for(shape[:-1], shape[-1], device=device, ignore_every=2)
    for reduction in REDUCTIONS:
        go = torch.randn(shape[:-1], device=device) if reduction == "none" else None
        check_against_reference(student, teacher, labels, grad_output=go, teacher_grad=True,
                                temperature=2.0, alpha=0.3, divergence=divergence,
                                reduction=reduction, softcap=30.0)


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_softcap_long_rows(device, divergence):
    """Rows long enough to be split across CUDA blocks / vector chunks."""
    vocab = 262_147 if device == "cuda" else 5_003
    student = logits((2, vocab), device=device, scale=20)
    teacher = logits((2, vocab), device=device, scale=20)
    labels = torch.tensor([vocab - 1, 3], device=device)
    check_against_reference(student, teacher, labels, teacher_grad=True, temperature=1.0,
                            alpha=0.3, divergence=divergence, reduction="none",
                            grad_output=torch.randn(2, device=device), softcap=30.0)


@pytest.mark.parametrize("dtypes", DTYPE_PAIRS, ids=pair_id)
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_softcap_dtypes(device, dtypes, divergence):
    # cap 5 for pairs with a bfloat16 side, 30 (at a scale of 40) for the others
    cap = 5.0 if torch.bfloat16 in dtypes else 30.0
    student = logits((12, 301), dtype=dtypes[0], device=device, scale=_scale_for(cap))
    teacher = logits((12, 301), dtype=dtypes[1], device=device, scale=_scale_for(cap))
    labels = labels_for((12,), 301, device=device)
    check_against_reference(student, teacher, labels, teacher_grad=True, temperature=2.0,
                            alpha=0.3, divergence=divergence, reduction="batchmean", softcap=cap)


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_softcap_float64_inputs(device, divergence):
    student = logits((5, 31), dtype=torch.float64, device=device, scale=20)
    teacher = logits((5, 31), dtype=torch.float64, device=device, scale=20)
    labels = labels_for((5,), 31, device=device)
    loss, _, _ = check_against_reference(student, teacher, labels, teacher_grad=True,
                                         temperature=2.0, alpha=0.3, divergence=divergence,
                                         softcap=5.0)
    assert loss.dtype == torch.float64


def _views(device):
    """(name, student, teacher): non-contiguous views, logits on the scale of the cap."""
    out = []
    base_s, base_t = logits((33, 9), device=device, scale=20), logits((33, 9), device=device,
                                                                        scale=20)
    out.append(("transposed_2d", base_s.t(), base_t.t()))
    s3, t3 = logits((4, 6, 35), device=device, scale=20), logits((4, 6, 35), device=device,
                                                                 scale=20)
    out.append(("sliced_3d", s3[:, :-1, :], t3[:, 1:, :]))
    big_s, big_t = logits((7, 45), device=device, scale=20), logits((7, 45), device=device,
                                                                    scale=20)
    out.append(("unaligned_vocab_slice", big_s[:, 1:42], big_t[:, 3:44]))
    out.append(("strided_vocab", big_s[:, :44:2], big_t[:, 1::2]))
    out.append(("expanded_teacher", big_s, big_t[:1].expand(7, 45)))
    out.append(("bf16_transposed_leading", s3.to(torch.bfloat16).transpose(0, 1),
                t3.transpose(0, 1)))
    return out


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_softcap_non_contiguous(device, divergence):
    for name, student, teacher in _views(device):
        labels = labels_for(student.shape[:-1], student.shape[-1], device=device)
        go = torch.randn(student.shape[:-1], device=device)
        try:
            check_against_reference(student, teacher, labels, grad_output=go, teacher_grad=True,
                                    temperature=2.0, alpha=0.3, divergence=divergence,
                                    reduction="none", softcap=5.0)
        except AssertionError as exc:
            raise AssertionError(f"layout {name}: {exc}") from exc
        contiguous = kdfast.kd_loss(student.contiguous(), teacher.contiguous(), labels,
                                    temperature=2.0, alpha=0.3, divergence=divergence,
                                    reduction="none", softcap=5.0)
        view = kdfast.kd_loss(student, teacher, labels, temperature=2.0, alpha=0.3,
                              divergence=divergence, reduction="none", softcap=5.0)
        torch.testing.assert_close(view, contiguous, rtol=1e-6, atol=1e-6,
                                   msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_softcap_only_teacher_requires_grad(device, divergence):
    student, teacher = logits((4, 30), device=device, scale=20), logits((4, 30), device=device,
                                                                        scale=20)
    t = teacher.clone().requires_grad_(True)
    loss = kdfast.kd_loss(student, t, temperature=2.0, divergence=divergence, softcap=5.0)
    loss.backward()
    ref, _, ref_gt = ref_loss_and_grads(student, teacher, None, teacher_grad=True,
                                        temperature=2.0, divergence=divergence, softcap=5.0)
    assert_close_fp32(loss, ref, *fp32_tolerances(2.0), "loss")
    assert_grad_close_fp32(t.grad, ref_gt, "grad_teacher")


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_softcap_saturated_logits(device, divergence):
    """Logits far beyond the cap (+-1e4, cap 5): capped to +-5 exactly; the gradient
    through the saturated tanh is 0 there and finite everywhere."""
    student = logits((4, 40), device=device)
    teacher = logits((4, 40), device=device)
    student[0, :10] = 1e4
    teacher[1, ::2] = -1e4
    student[2, 5] = -1e4
    teacher[3] += 1e4
    labels = torch.tensor([0, 1, 5, 7], device=device)
    loss, gs, gt = check_against_reference(student, teacher, labels, teacher_grad=True,
                                           temperature=1.0, alpha=0.3, divergence=divergence,
                                           reduction="none", softcap=5.0,
                                           grad_output=torch.rand(4, device=device) + 0.5)
    assert torch.isfinite(loss).all() and torch.isfinite(gs).all() and torch.isfinite(gt).all()
    assert torch.all(gs[0, :10].abs() < 1e-6) and torch.all(gt[3].abs() < 1e-6)


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_softcap_cross_entropy_term(device, divergence):
    """alpha = 1: the loss is the cross-entropy of the capped student logits."""
    student = logits((6, 50), device=device, scale=20)
    teacher = logits((6, 50), device=device)
    labels = torch.tensor([0, 5, -100, 17, 30, 49], device=device)
    rows = kdfast.kd_loss(student, teacher, labels, alpha=1.0, divergence=divergence,
                          reduction="none", softcap=5.0)
    capped = 5.0 * torch.tanh(student.double() / 5.0)
    expected = F.cross_entropy(capped, labels, reduction="none")
    assert_close_fp32(rows, expected, rtol=1e-5, atol=1e-6, what="capped cross-entropy")


def test_softcap_huge_is_no_softcap(device):
    student, teacher = logits((5, 40), device=device), logits((5, 40), device=device)
    labels = labels_for((5,), 40, device=device)
    for div in DIVERGENCES:
        a = kdfast.kd_loss(student, teacher, labels, temperature=2.0, alpha=0.3, divergence=div,
                           reduction="none", softcap=1e6)
        b = kdfast.kd_loss(student, teacher, labels, temperature=2.0, alpha=0.3, divergence=div,
                           reduction="none")
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_softcap_none_is_the_default(device):
    student, teacher = logits((5, 40), device=device, scale=20), logits((5, 40), device=device,
                                                                        scale=20)
    torch.testing.assert_close(kdfast.kd_loss(student, teacher, softcap=None),
                               kdfast.kd_loss(student, teacher), rtol=0, atol=0)
    # An int cap is a number like any other.
    torch.testing.assert_close(kdfast.kd_loss(student, teacher, softcap=5),
                               kdfast.kd_loss(student, teacher, softcap=5.0), rtol=0, atol=0)


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_softcap_kdloss_module(device, divergence):
    crit = kdfast.KDLoss(temperature=4.0, alpha=0.1, divergence=divergence, reduction="sum",
                         softcap=30.0)
    student = logits((6, 20), device=device, scale=40)
    teacher = logits((6, 20), device=device, scale=40)
    labels = labels_for((6,), 20, device=device)
    s = student.clone().requires_grad_(True)
    loss = crit(s, teacher, labels)
    loss.backward()
    ref, ref_gs, _ = ref_loss_and_grads(student, teacher, labels, temperature=4.0, alpha=0.1,
                                        divergence=divergence, reduction="sum", softcap=30.0)
    assert_close_fp32(loss, ref, *fp32_tolerances(4.0), "loss")
    assert_grad_close_fp32(s.grad, ref_gs, "grad_student")


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_softcap_empty_batch(device, reduction):
    student = logits((0, 10), device=device, requires_grad=True)
    teacher = logits((0, 10), device=device)
    loss = kdfast.kd_loss(student, teacher, temperature=2.0, reduction=reduction, softcap=5.0)
    loss.sum().backward()
    assert loss.shape == ((0,) if reduction == "none" else ())
    assert student.grad.shape == (0, 10)


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_softcap_nan_gives_nan(device, divergence):
    """tanh(NaN) is NaN: the row is NaN, the other rows are untouched."""
    student = logits((4, 30), device=device, scale=20)
    teacher = logits((4, 30), device=device, scale=20)
    student[1, 7] = math.nan
    s = student.clone().requires_grad_(True)
    rows = kdfast.kd_loss(s, teacher, temperature=2.0, divergence=divergence, reduction="none",
                          softcap=5.0)
    assert torch.isnan(rows[1]), rows
    rows.backward(torch.ones(4, device=device))
    keep = [0, 2, 3]
    ref, ref_gs, _ = ref_loss_and_grads(student[keep], teacher[keep], None, temperature=2.0,
                                        divergence=divergence, reduction="none", softcap=5.0)
    assert_close_fp32(rows[keep], ref, *fp32_tolerances(2.0), "other rows")
    assert_grad_close_fp32(s.grad[keep], ref_gs, "grad_student other rows")


# ----------------------------------------------------------------------------- masked vocabulary


@pytest.mark.parametrize("temperature", (0.5, 2.0), ids=lambda t: f"T{t:g}")
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_softcap_masked_vocabulary(device, divergence, temperature):
    """-inf stays -inf under the cap: masked entries drop out of the loss, get exactly
    zero gradient, and the rest equals the loss on the kept columns."""
    vocab = 41
    masked = [0, 3, 4, 20, 40]
    keep = [j for j in range(vocab) if j not in masked]
    student = logits((5, vocab), device=device, scale=20)
    teacher = logits((5, vocab), device=device, scale=20)
    student[:, masked] = -INF
    teacher[:, masked] = -INF
    labels = torch.tensor([keep[0], -100, keep[7], keep[-1], 1], device=device)
    go = torch.randn(5, device=device)
    s = student.clone().requires_grad_(True)
    t = teacher.clone().requires_grad_(True)
    rows = kdfast.kd_loss(s, t, labels, temperature=temperature, alpha=0.3, divergence=divergence,
                          reduction="none", softcap=5.0)
    rows.backward(go)
    assert torch.isfinite(rows).all(), rows
    assert torch.isfinite(s.grad).all() and torch.isfinite(t.grad).all()
    assert torch.all(s.grad[:, masked] == 0) and torch.all(t.grad[:, masked] == 0)
    remap = {j: i for i, j in enumerate(keep)}
    labels_kept = torch.tensor([remap.get(int(y), -100) for y in labels], device=device)
    ref, ref_gs, ref_gt = ref_loss_and_grads(student[:, keep], teacher[:, keep], labels_kept,
                                             grad_output=go.double(), teacher_grad=True,
                                             temperature=temperature, alpha=0.3,
                                             divergence=divergence, reduction="none",
                                             softcap=5.0)
    assert_close_fp32(rows, ref, *fp32_tolerances(temperature), "loss")
    assert_grad_close_fp32(s.grad[:, keep], ref_gs, "grad_student")
    assert_grad_close_fp32(t.grad[:, keep], ref_gt, "grad_teacher")


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16, torch.float16), ids=str)
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_softcap_per_row_masks(device, divergence, dtype):
    student = logits((8, 301), dtype=dtype, device=device, scale=20)
    teacher = logits((8, 301), dtype=dtype, device=device, scale=20)
    mask = torch.rand(8, 301, device=device) < 0.4
    mask[:, 0] = False
    student = student.masked_fill(mask, -INF)
    teacher = teacher.masked_fill(mask, -INF)
    labels = torch.zeros(8, dtype=torch.int64, device=device)
    labels[1::3] = -100
    loss, gs, gt = check_against_reference(student, teacher, labels, teacher_grad=True,
                                           temperature=2.0, alpha=0.3, divergence=divergence,
                                           reduction="sum", softcap=5.0)
    assert torch.isfinite(loss) and torch.isfinite(gs).all() and torch.isfinite(gt).all()
    assert torch.all(gs[mask] == 0) and torch.all(gt[mask] == 0)


def test_softcap_one_sided_mask_stays_infinite(device):
    """A student entry masked where the teacher has mass: KL(p||q) is still inf (the cap
    does not turn -inf into -c)."""
    student, teacher = logits((3, 20), device=device, scale=20), logits((3, 20), device=device,
                                                                        scale=20)
    student[1, 4] = -INF
    rows = kdfast.kd_loss(student, teacher, temperature=2.0, reduction="none", softcap=5.0)
    assert rows[1] == INF, rows
    ref = ref_kd_loss_rows(student, teacher, temperature=2.0, softcap=5.0)
    assert_close_fp32(rows[[0, 2]], ref[[0, 2]], *fp32_tolerances(2.0), "finite rows")


# ----------------------------------------------------------------------------- autograd / compile


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_softcap_gradcheck_float64(device, divergence, reduction):
    s = logits((4, 7), dtype=torch.float64, device=device, scale=6, requires_grad=True)
    t = logits((4, 7), dtype=torch.float64, device=device, scale=6, requires_grad=True)
    y = torch.tensor([2, -100, 6, 0], device=device)

    def fn(student, teacher):
        return kdfast.kd_loss(student, teacher, y, temperature=1.5, alpha=0.3,
                              divergence=divergence, beta=0.3, reduction=reduction, softcap=3.0)

    assert torch.autograd.gradcheck(fn, (s, t), eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.usefixtures("fresh_dynamo")
@pytest.mark.parametrize("backend", ("aot_eager", "inductor"))
def test_softcap_compile_fullgraph(device, backend):
    def step(student, teacher, labels, weights):
        rows = kdfast.kd_loss(student, teacher, labels, temperature=2.0, alpha=0.3,
                              divergence="jsd", beta=0.4, reduction="none", softcap=5.0)
        return (rows * weights).sum()

    compiled = torch.compile(step, fullgraph=True, backend=backend)
    student = logits((6, 40), device=device, scale=20)
    teacher = logits((6, 40), device=device, scale=20)
    labels = labels_for((6,), 40, device=device)
    weights = torch.rand(6, device=device)
    s_c = student.clone().requires_grad_(True)
    t_c = teacher.clone().requires_grad_(True)
    out = compiled(s_c, t_c, labels, weights)
    out.backward()
    s_e = student.clone().requires_grad_(True)
    t_e = teacher.clone().requires_grad_(True)
    out_e = step(s_e, t_e, labels, weights)
    out_e.backward()
    torch.testing.assert_close(out, out_e, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(s_c.grad, s_e.grad, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(t_c.grad, t_e.grad, rtol=1e-6, atol=1e-7)
    ref, ref_gs, ref_gt = ref_loss_and_grads(student, teacher, labels, grad_output=weights.double(),
                                             teacher_grad=True, temperature=2.0, alpha=0.3,
                                             divergence="jsd", beta=0.4, reduction="none",
                                             softcap=5.0)
    assert_close_fp32(out, (ref * weights.double()).sum(), *fp32_tolerances(2.0), "loss")
    assert_grad_close_fp32(s_c.grad, ref_gs, "grad_student")
    assert_grad_close_fp32(t_c.grad, ref_gt, "grad_teacher")


# ----------------------------------------------------------------------------- argument checks


@pytest.mark.parametrize("softcap", (0.0, -1.0, -1e-3, 0, INF, -INF, math.nan),
                         ids=("zero", "negative", "tiny_negative", "int_zero", "inf", "minus_inf",
                              "nan"))
def test_bad_softcap_value(device, softcap):
    s, t = logits((4, 10), device=device), logits((4, 10), device=device)
    with pytest.raises(ValueError, match="softcap"):
        kdfast.kd_loss(s, t, softcap=softcap)
    with pytest.raises(ValueError, match="softcap"):
        kdfast.kd_loss(s.requires_grad_(True), t, softcap=softcap)
    with pytest.raises(ValueError, match="softcap"):
        kdfast.KDLoss(softcap=softcap)(s, t)


@pytest.mark.parametrize("softcap", (True, False, "5", [5.0]),
                         ids=("true", "false", "str", "list"))
def test_softcap_wrong_type(device, softcap):
    s, t = logits((4, 10), device=device), logits((4, 10), device=device)
    with pytest.raises(TypeError, match="softcap"):
        kdfast.kd_loss(s, t, softcap=softcap)
    with pytest.raises(TypeError, match="softcap"):
        kdfast.KDLoss(softcap=softcap)(s, t)


def test_bad_softcap_leaves_no_state(device):
    s, t = logits((4, 10), device=device), logits((4, 10), device=device)
    with pytest.raises(ERRORS):
        kdfast.kd_loss(s, t, softcap=-2.0)
    assert torch.isfinite(kdfast.kd_loss(s, t, softcap=2.0))
