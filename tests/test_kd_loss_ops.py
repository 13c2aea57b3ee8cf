"""The kdfast::kd_loss_fused / kd_loss_backward / kd_loss_scale_grad_ ops: torch.library.opcheck,
torch.autograd.gradcheck in float64, torch.compile(fullgraph=True), and the ops'
outputs against the contract of docs/kd_loss_math.md."""

from __future__ import annotations

import pytest
import torch
from fp64_reference import ref_kd_loss_rows, ref_loss_and_grads
from kd_helpers import (
    assert_close_fp32,
    assert_grad_close_fp32,
    fp32_tolerances,
    labels_for,
    logits,
)

import kdfast

pytestmark = pytest.mark.usefixtures("needs_extension", "fresh_dynamo")

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")
CODES = {name: i for i, name in enumerate(DIVERGENCES)}


def _op_samples(device):
    """kd_loss_fused arguments: (student, teacher, labels, temperature, alpha, code, beta,
    ignore_index, softcap, reduction, student_requires_grad, teacher_requires_grad)."""
    out = []
    for code in range(3):
        s = logits((5, 17), device=device, requires_grad=True)
        t = logits((5, 17), device=device, requires_grad=True)
        y = labels_for((5,), 17, device=device)
        out.append((s, t, y, 2.0, 0.3, code, 0.4, -100, 0.0, 0, True, True))
        out.append((s, t.detach(), None, 0.5, 0.0, code, 0.5, -100, 0.0, 1, True, False))
        out.append((s, t.detach(), y, 1.0, 0.2, code, 0.5, -100, 4.0, 2, True, False))
        out.append((s.detach(), t.detach(), None, 3.0, 0.0, code, 0.5, -100, 0.0, 0, False, False))
    s3 = logits((2, 3, 9), dtype=torch.bfloat16, device=device, requires_grad=True)
    t3 = logits((2, 3, 9), dtype=torch.float32, device=device)
    out.append((s3, t3, labels_for((2, 3), 9, device=device), 4.0, 0.5, 2, 0.5, -100, 0.0, 2,
                True, False))
    s4 = logits((9, 6), device=device).t().requires_grad_(True)  # non-contiguous
    t4 = logits((6, 9), dtype=torch.float16, device=device)
    out.append((s4, t4, None, 1.0, 0.0, 1, 0.5, -100, 0.0, 0, True, False))
    return out


def test_opcheck_fused(device):
    for args in _op_samples(device):
        torch.library.opcheck(torch.ops.kdfast.kd_loss_fused.default, args)


def test_opcheck_backward(device):
    for args in _op_samples(device):
        s, t, y, temperature, alpha, code, beta, ignore, cap, reduction, _, _ = args
        with torch.no_grad():
            _, stats, _, _ = torch.ops.kdfast.kd_loss_fused(s, t, y, temperature, alpha, code, beta,
                                                            ignore, cap, reduction, False, False)
        grad_loss = torch.randn(s.shape[:-1], device=device)
        for need_s, need_t in ((True, False), (False, True), (True, True)):
            torch.library.opcheck(
                torch.ops.kdfast.kd_loss_backward.default,
                (grad_loss, s.detach(), t.detach(), y, stats, temperature, alpha, code, beta,
                 ignore, cap, need_s, need_t))


def test_opcheck_scale_grad(device):
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        grad = logits((4, 3, 11), dtype=dtype, device=device)
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        for scale in (torch.tensor(2.5, dtype=acc, device=device),
                      torch.tensor([1.0, 0.5, -2.0, 1.0] * 3, dtype=acc, device=device)):
            torch.library.opcheck(torch.ops.kdfast.kd_loss_scale_grad_.default, (grad, scale))


def test_scale_grad_values(device):
    """Rows scaled by their own weight, rows with weight exactly 1 left bit-for-bit alone."""
    grad = logits((6, 37), dtype=torch.bfloat16, device=device)
    scale = torch.tensor([1.0, 0.5, -3.0, 0.0, 1.0, 1e-3], device=device)
    expected = (grad.float() * scale[:, None]).to(torch.bfloat16)
    out = grad.clone()
    torch.ops.kdfast.kd_loss_scale_grad_(out, scale)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    out = grad.clone()
    torch.ops.kdfast.kd_loss_scale_grad_(out, torch.tensor(1.0, device=device))
    assert torch.equal(out, grad)


def test_fused_op_outputs(device):
    s, t = logits((2, 3, 50), device=device), logits((2, 3, 50), device=device)
    y = labels_for((2, 3), 50, device=device)
    loss, stats, gs, gt = torch.ops.kdfast.kd_loss_fused(s, t, y, 2.0, 0.3, 2, 0.5, -100, 0.0, 2,
                                                         True, False)
    assert loss.shape == (2, 3) and loss.dtype == torch.float32
    assert stats.shape == (6, 7) and stats.dtype == torch.float32
    assert gs.shape == s.shape and gt.numel() == 0
    ref = ref_kd_loss_rows(s, t, y, temperature=2.0, alpha=0.3, divergence="jsd")
    assert_close_fp32(loss, ref, *fp32_tolerances(2.0), "per-row loss")
    s2, t2 = s.reshape(6, 50).double(), t.reshape(6, 50).double()
    counted = y.reshape(6) != -100
    expected = torch.stack([
        s2.amax(-1), t2.amax(-1),
        torch.logsumexp((s2 - s2.amax(-1, keepdim=True)) / 2.0, -1),
        torch.logsumexp((t2 - t2.amax(-1, keepdim=True)) / 2.0, -1),
        torch.logsumexp(s2 - s2.amax(-1, keepdim=True), -1),
    ], -1)
    torch.testing.assert_close(stats[counted, :5].double(), expected[counted], rtol=1e-5,
                               atol=1e-5)
    # The gradient of the (unreduced) per-row loss summed, i.e. weight 1 per row.
    _, ref_gs, _ = ref_loss_and_grads(s, t, y, temperature=2.0, alpha=0.3, divergence="jsd",
                                      reduction="sum")
    assert_grad_close_fp32(gs, ref_gs, "grad_student")


def test_backward_op_empty_when_not_requested(device):
    s, t = logits((4, 20), device=device), logits((4, 20), dtype=torch.bfloat16, device=device)
    loss, stats, gs, gt = torch.ops.kdfast.kd_loss_fused(s, t, None, 1.0, 0.0, 0, 0.5, -100, 0.0,
                                                         2, False, False)
    assert gs.numel() == 0 and gt.numel() == 0
    gs, gt = torch.ops.kdfast.kd_loss_backward(torch.ones_like(loss), s, t, None, stats, 1.0, 0.0,
                                               0, 0.5, -100, 0.0, True, False)
    assert gs.shape == s.shape and gs.dtype == s.dtype and gt.numel() == 0
    gs, gt = torch.ops.kdfast.kd_loss_backward(torch.ones_like(loss), s, t, None, stats, 1.0, 0.0,
                                               0, 0.5, -100, 0.0, False, True)
    assert gs.numel() == 0 and gt.shape == t.shape and gt.dtype == torch.bfloat16


# ----------------------------------------------------------------------------- gradcheck


@pytest.mark.parametrize("reduction", ("batchmean", "sum", "none"))
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_gradcheck_float64(device, divergence, reduction):
    s = logits((4, 7), dtype=torch.float64, device=device, scale=1.5, requires_grad=True)
    t = logits((4, 7), dtype=torch.float64, device=device, scale=1.5, requires_grad=True)
    y = torch.tensor([2, -100, 6, 0], device=device)

    def fn(student, teacher):
        return kdfast.kd_loss(student, teacher, y, temperature=2.0, alpha=0.3,
                              divergence=divergence, beta=0.3, reduction=reduction)

    assert torch.autograd.gradcheck(fn, (s, t), eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_gradcheck_float64_without_labels_3d(device, divergence):
    s = logits((2, 3, 5), dtype=torch.float64, device=device, scale=1.5, requires_grad=True)
    t = logits((2, 3, 5), dtype=torch.float64, device=device, scale=1.5, requires_grad=True)

    def fn(student, teacher):
        return kdfast.kd_loss(student, teacher, temperature=0.5, divergence=divergence,
                              reduction="none")

    assert torch.autograd.gradcheck(fn, (s, t), eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_gradcheck_ops_directly(device, divergence):
    s = logits((3, 6), dtype=torch.float64, device=device, requires_grad=True)
    t = logits((3, 6), dtype=torch.float64, device=device, requires_grad=True)
    y = torch.tensor([1, 5, -100], device=device)

    def fn(student, teacher):
        return torch.ops.kdfast.kd_loss_fused(student, teacher, y, 1.5, 0.2, CODES[divergence],
                                              0.6, -100, 0.0, 2, True, True)[0]

    assert torch.autograd.gradcheck(fn, (s, t), eps=1e-6, atol=1e-7, rtol=1e-5)


# ----------------------------------------------------------------------------- torch.compile




@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_compile_fullgraph(device, divergence):
    """The whole loss (op + reduction + backward) compiles without graph breaks and
    matches eager numbers and the float64 reference."""

    def step(student, teacher, labels):
        loss = kdfast.kd_loss(student, teacher, labels, temperature=2.0, alpha=0.3,
                              divergence=divergence)
        return loss * 3.7

    compiled = torch.compile(step, fullgraph=True, backend="inductor")
    student, teacher = logits((6, 40), device=device), logits((6, 40), device=device)
    labels = labels_for((6,), 40, device=device)
    s_c = student.clone().requires_grad_(True)
    t_c = teacher.clone().requires_grad_(True)
    out_c = compiled(s_c, t_c, labels)
    out_c.backward()
    s_e = student.clone().requires_grad_(True)
    t_e = teacher.clone().requires_grad_(True)
    out_e = step(s_e, t_e, labels)
    out_e.backward()
    torch.testing.assert_close(out_c, out_e, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(s_c.grad, s_e.grad, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(t_c.grad, t_e.grad, rtol=1e-6, atol=1e-7)
    ref, ref_gs, ref_gt = ref_loss_and_grads(student, teacher, labels, teacher_grad=True,
                                             temperature=2.0, alpha=0.3, divergence=divergence)
    assert_close_fp32(out_c / 3.7, ref, *fp32_tolerances(2.0), "compiled loss")
    assert_grad_close_fp32(s_c.grad, ref_gs * 3.7, "compiled grad_student")
    assert_grad_close_fp32(t_c.grad, ref_gt * 3.7, "compiled grad_teacher")


def test_compile_module_reduction_none_mixed_dtypes(device):
    crit = kdfast.KDLoss(temperature=4.0, divergence="reverse_kl", reduction="none")

    def step(student, teacher, labels, weights):
        return (crit(student, teacher, labels) * weights).sum()

    compiled = torch.compile(step, fullgraph=True)
    student = logits((3, 5, 33), dtype=torch.bfloat16, device=device)
    teacher = logits((3, 5, 33), device=device)
    labels = labels_for((3, 5), 33, device=device)
    weights = torch.rand(3, 5, device=device)
    s_c = student.clone().requires_grad_(True)
    compiled(s_c, teacher, labels, weights).backward()
    s_e = student.clone().requires_grad_(True)
    step(s_e, teacher, labels, weights).backward()
    assert s_c.grad.dtype == torch.bfloat16
    torch.testing.assert_close(s_c.grad, s_e.grad, rtol=0, atol=0)


def test_compile_dynamic_shapes(device):
    """Different batch sizes and vocabularies through one dynamically compiled graph."""
    compiled = torch.compile(lambda s, t: kdfast.kd_loss(s, t, temperature=2.0,
                                                         reduction="none"),
                             fullgraph=True, dynamic=True)
    for rows, vocab in ((3, 17), (5, 17), (4, 29)):
        s, t = logits((rows, vocab), device=device), logits((rows, vocab), device=device)
        out = compiled(s, t)
        assert out.shape == (rows,)
        assert_close_fp32(out, ref_kd_loss_rows(s, t, temperature=2.0), *fp32_tolerances(2.0),
                          f"dynamic {rows}x{vocab}")
