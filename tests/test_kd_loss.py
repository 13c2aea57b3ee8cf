"""kdfast.kd_loss / KDLoss against the independent float64 reference (fp64_reference.py):
loss and gradients for every divergence, temperature, alpha and reduction; shapes,
layouts and dtypes; grad_output != 1; mutual distillation."""

from __future__ import annotations

import pytest
import torch
from fp64_reference import ref_kd_loss, ref_loss_and_grads
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
TEMPERATURES = (0.5, 1.0, 2.0, 4.0, 10.0)
ALPHAS = (0.0, 0.3, 1.0)
REDUCTIONS = ("batchmean", "sum", "none")


def test_cpu_kernel_is_built():
    # CPU kernels are always built; without them every test below checks the fallback only.
    assert kdfast.has_extension()
    assert kdfast.has_kernel("kd_loss_fused", "cpu")
    assert kdfast.has_kernel("kd_loss_backward", "cpu")
    assert not kdfast.has_kernel("kd_loss_no_such_op", "cpu")


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("alpha", ALPHAS)
@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_loss_and_grad_grid(device, divergence, temperature, alpha, reduction):
    student = logits((6, 37), device=device)
    teacher = logits((6, 37), device=device)
    labels = labels_for((6,), 37, device=device)  # rows 1 and 4 ignored
    grad_output = None
    if reduction == "none":
        grad_output = torch.randn(6, device=device)
    beta = 0.3 if divergence == "jsd" else 0.5
    loss, gs, _ = check_against_reference(
        student, teacher, labels, grad_output=grad_output, temperature=temperature, alpha=alpha,
        divergence=divergence, beta=beta, reduction=reduction)
    # Ignored rows: zero loss and exactly zero gradient.
    if reduction == "none":
        assert torch.all(loss[labels == -100] == 0)
    assert torch.all(gs[labels == -100] == 0)


@pytest.mark.parametrize("temperature", (0.5, 4.0))
@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_without_labels(device, divergence, temperature, reduction):
    student, teacher = logits((5, 29), device=device), logits((5, 29), device=device)
    go = torch.randn(5, device=device) if reduction == "none" else None
    check_against_reference(student, teacher, None, grad_output=go, temperature=temperature,
                            divergence=divergence, reduction=reduction)


@pytest.mark.parametrize("beta", (0.1, 0.5, 0.9))
def test_jsd_beta(device, beta):
    student, teacher = logits((4, 50), device=device), logits((4, 50), device=device)
    labels = labels_for((4,), 50, device=device)
    check_against_reference(student, teacher, labels, teacher_grad=True, temperature=2.0,
                            alpha=0.3, divergence="jsd", beta=beta)


def test_jsd_beta_changes_the_loss(device):
    student, teacher = logits((4, 50), device=device), logits((4, 50), device=device)
    a = kdfast.kd_loss(student, teacher, divergence="jsd", beta=0.1)
    b = kdfast.kd_loss(student, teacher, divergence="jsd", beta=0.9)
    assert abs(float(a) - float(b)) > 1e-3


@pytest.mark.parametrize("alpha", (0.0, 0.3))
@pytest.mark.parametrize("temperature", (0.5, 4.0))
@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_teacher_requires_grad(device, divergence, temperature, alpha, reduction):
    """Mutual / online distillation: the gradient reaches teacher_logits too."""
    student, teacher = logits((7, 41), device=device), logits((7, 41), device=device)
    labels = labels_for((7,), 41, device=device)
    go = torch.randn(7, device=device) if reduction == "none" else None
    _, _, gt = check_against_reference(student, teacher, labels, grad_output=go,
                                       teacher_grad=True, temperature=temperature, alpha=alpha,
                                       divergence=divergence, reduction=reduction)
    assert gt.abs().sum() > 0
    assert torch.all(gt[labels == -100] == 0)


def test_only_teacher_requires_grad(device):
    student, teacher = logits((4, 30), device=device), logits((4, 30), device=device)
    t = teacher.clone().requires_grad_(True)
    kdfast.kd_loss(student, t, temperature=2.0, divergence="reverse_kl").backward()
    _, _, ref_gt = ref_loss_and_grads(student, teacher, None, teacher_grad=True, temperature=2.0,
                                      divergence="reverse_kl")
    assert_grad_close_fp32(t.grad, ref_gt, "grad_teacher")


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("reduction", ("batchmean", "sum"))
def test_grad_output_scaled(device, divergence, reduction):
    """The loss is not the last op: (loss * 3.7).backward() scales every gradient."""
    student, teacher = logits((5, 23), device=device), logits((5, 23), device=device)
    labels = labels_for((5,), 23, device=device)
    s = student.clone().requires_grad_(True)
    t = teacher.clone().requires_grad_(True)
    loss = kdfast.kd_loss(s, t, labels, temperature=2.0, alpha=0.3, divergence=divergence,
                          reduction=reduction)
    (loss * 3.7).backward()
    _, ref_gs, ref_gt = ref_loss_and_grads(student, teacher, labels, grad_output=3.7,
                                           teacher_grad=True, temperature=2.0, alpha=0.3,
                                           divergence=divergence, reduction=reduction)
    assert_grad_close_fp32(s.grad, ref_gs, "grad_student")
    assert_grad_close_fp32(t.grad, ref_gt, "grad_teacher")


def test_grad_output_from_later_ops(device):
    """Per-row losses weighted and combined with another loss before backward."""
    student, teacher = logits((3, 4, 19), device=device), logits((3, 4, 19), device=device)
    labels = labels_for((3, 4), 19, device=device)
    weights = torch.rand(3, 4, device=device) * 5
    s = student.clone().requires_grad_(True)
    rows = kdfast.kd_loss(s, teacher, labels, temperature=4.0, alpha=0.3, reduction="none")
    (rows * weights).sum().backward()
    _, ref_gs, _ = ref_loss_and_grads(student, teacher, labels, grad_output=weights,
                                      temperature=4.0, alpha=0.3, reduction="none")
    assert_grad_close_fp32(s.grad, ref_gs, "grad_student")


def test_retain_graph_backward_twice(device):
    student, teacher = logits((4, 33), device=device), logits((4, 33), device=device)
    s = student.clone().requires_grad_(True)
    loss = kdfast.kd_loss(s, teacher, temperature=2.0, divergence="jsd")
    loss.backward(retain_graph=True)
    first = s.grad.clone()
    loss.backward()
    torch.testing.assert_close(s.grad, 2 * first)


def test_no_grad_inputs(device):
    student, teacher = logits((4, 33), device=device), logits((4, 33), device=device)
    loss = kdfast.kd_loss(student, teacher, temperature=2.0)
    assert not loss.requires_grad
    with torch.no_grad():
        loss2 = kdfast.kd_loss(student.requires_grad_(True), teacher, temperature=2.0)
    assert not loss2.requires_grad
    torch.testing.assert_close(loss, loss2)


# ----------------------------------------------------------------------------- shapes


@pytest.mark.parametrize("shape", [(37,), (1, 1), (1, 37), (5, 1), (4, 5, 33), (2, 3, 4, 17),
                                   (3, 1, 2, 9)], ids=str)
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_shapes(device, shape, divergence):
    student, teacher = logits(shape, device=device), logits(shape, device=device)
    labels = labels_for(shape[:-1], shape[-1], device=device, ignore_every=2)
    for reduction in REDUCTIONS:
        go = torch.randn(shape[:-1], device=device) if reduction == "none" else None
        check_against_reference(student, teacher, labels, grad_output=go, teacher_grad=True,
                                temperature=2.0, alpha=0.3, divergence=divergence,
                                reduction=reduction)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_empty_batch(device, reduction):
    student = logits((0, 10), device=device, requires_grad=True)
    teacher = logits((0, 10), device=device)
    loss = kdfast.kd_loss(student, teacher, temperature=2.0, reduction=reduction)
    if reduction == "none":
        assert loss.shape == (0,)
        loss.sum().backward()
    else:
        assert loss.shape == () and float(loss.detach()) == 0.0
        loss.backward()
    assert student.grad.shape == (0, 10)


VOCABS = (1, 2, 3, 7, 8, 15, 16, 17, 31, 33, 63, 64, 65, 127, 129, 255, 257, 1000, 1023, 1025,
          4097)


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16, torch.float16), ids=str)
@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("vocab", VOCABS)
def test_vocab_sizes(device, vocab, divergence, dtype):
    """V not a multiple of any vector width (CPU AVX2/AVX512, CUDA 16-byte loads)."""
    student = logits((3, vocab), dtype=dtype, device=device)
    teacher = logits((3, vocab), dtype=dtype, device=device)
    labels = labels_for((3,), vocab, device=device)
    check_against_reference(student, teacher, labels, teacher_grad=True, temperature=2.0,
                            alpha=0.3, divergence=divergence, reduction="sum")


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_long_rows(device, divergence):
    """Rows long enough to be split across CUDA blocks / CPU chunks."""
    vocab = 262_147 if device == "cuda" else 70_001
    student = logits((3, vocab), device=device)
    teacher = logits((3, vocab), device=device)
    labels = torch.tensor([5, -100, vocab - 1], device=device)
    check_against_reference(student, teacher, labels, teacher_grad=True, temperature=1.0,
                            alpha=0.3, divergence=divergence, reduction="none",
                            grad_output=torch.randn(3, device=device))


def test_many_rows(device):
    """More rows than threads / blocks, so rows are spread over workers."""
    student, teacher = logits((2053, 67), device=device), logits((2053, 67), device=device)
    labels = labels_for((2053,), 67, device=device, ignore_every=5)
    check_against_reference(student, teacher, labels, teacher_grad=True, temperature=2.0,
                            alpha=0.3, divergence="jsd", reduction="batchmean")


@pytest.mark.slow
def test_large_awkward_shape(device):
    """41 x 401 x 1271 (Liger-Kernel's awkward shape), sliced to drop the last position."""
    shape = (41, 402, 1271)
    full_s = logits(shape, device=device)
    full_t = logits(shape, device=device)
    student, teacher = full_s[:, :-1, :], full_t[:, :-1, :]
    labels = labels_for((41, 401), 1271, device=device, ignore_every=7)
    check_against_reference(student, teacher, labels, temperature=2.0, alpha=0.3,
                            divergence="forward_kl", reduction="batchmean")


# ----------------------------------------------------------------------------- layouts


def _layouts(device):
    """(name, student, teacher): non-contiguous views of the same [..., V] logits."""
    out = []
    base_s = logits((33, 9), device=device)
    base_t = logits((33, 9), device=device)
    out.append(("transposed_2d", base_s.t(), base_t.t()))  # [9, 33], stride(-1) = 9
    s3, t3 = logits((4, 6, 35), device=device), logits((4, 6, 35), device=device)
    out.append(("sliced_3d", s3[:, :-1, :], t3[:, 1:, :]))
    out.append(("transposed_leading_3d", s3.transpose(0, 1), t3.transpose(0, 1)))
    big_s, big_t = logits((7, 45), device=device), logits((7, 45), device=device)
    out.append(("unaligned_vocab_slice", big_s[:, 1:42], big_t[:, 3:44]))  # odd offsets
    out.append(("strided_vocab", big_s[:, :44:2], big_t[:, 1::2]))  # stride(-1) = 2
    out.append(("strided_rows", big_s[:6:2, :], big_t[1::2, :]))
    row = logits((1, 45), device=device)
    out.append(("expanded_teacher", big_s, row.expand(7, 45)))  # row stride 0
    s4, t4 = logits((2, 3, 4, 5, 11), device=device), logits((3, 4, 2, 5, 11), device=device)
    out.append(("permuted_4d", s4.permute(2, 0, 3, 1, 4)[:, :, 1:],  # [4, 2, 4, 3, 11]
                 t4.permute(1, 2, 3, 0, 4)[:, :, 1:]))
    out.append(("mixed_layouts", s3[:, :-1, :], logits((4, 5, 35), device=device)))
    return out


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_non_contiguous_inputs(device, divergence):
    for name, student, teacher in _layouts(device):
        assert student.shape == teacher.shape, name
        labels = labels_for(student.shape[:-1], student.shape[-1], device=device)
        go = torch.randn(student.shape[:-1], device=device)
        try:
            check_against_reference(student, teacher, labels, grad_output=go, teacher_grad=True,
                                    temperature=2.0, alpha=0.3, divergence=divergence,
                                    reduction="none")
        except AssertionError as exc:
            raise AssertionError(f"layout {name}: {exc}") from exc


def test_non_contiguous_matches_contiguous(device):
    """A view and its contiguous copy give the same numbers (to float32 rounding)."""
    for name, student, teacher in _layouts(device):
        a = kdfast.kd_loss(student, teacher, temperature=2.0, reduction="none")
        b = kdfast.kd_loss(student.contiguous(), teacher.contiguous(), temperature=2.0,
                           reduction="none")
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")


def test_non_contiguous_labels(device):
    student, teacher = logits((6, 5, 13), device=device), logits((6, 5, 13), device=device)
    labels = labels_for((5, 6), 13, device=device).t()  # [6, 5], non-contiguous
    check_against_reference(student, teacher, labels, temperature=2.0, alpha=0.5,
                            reduction="batchmean")


# ----------------------------------------------------------------------------- dtypes

@pytest.mark.parametrize("dtypes", DTYPE_PAIRS, ids=pair_id)
@pytest.mark.parametrize("temperature", (0.5, 1.0, 4.0))
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_dtypes(device, dtypes, divergence, temperature):
    s_dtype, t_dtype = dtypes
    student = logits((16, 301), dtype=s_dtype, device=device)
    teacher = logits((16, 301), dtype=t_dtype, device=device)
    labels = labels_for((16,), 301, device=device)
    check_against_reference(student, teacher, labels, teacher_grad=True, temperature=temperature,
                            alpha=0.3, divergence=divergence, reduction="batchmean")


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_float64_inputs(device, divergence):
    student = logits((5, 31), dtype=torch.float64, device=device)
    teacher = logits((5, 31), dtype=torch.float64, device=device)
    labels = labels_for((5,), 31, device=device)
    loss, _gs, _gt = check_against_reference(student, teacher, labels, teacher_grad=True,
                                           temperature=2.0, alpha=0.3, divergence=divergence)
    assert loss.dtype == torch.float64


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16, torch.float16), ids=str)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_output_dtype_and_shape(device, dtype, reduction):
    student = logits((2, 3, 10), dtype=dtype, device=device, requires_grad=True)
    teacher = logits((2, 3, 10), dtype=dtype, device=device)
    loss = kdfast.kd_loss(student, teacher, reduction=reduction)
    assert loss.dtype == torch.float32
    assert loss.device == student.device
    assert loss.shape == ((2, 3) if reduction == "none" else ())
    loss.sum().backward()
    assert student.grad.dtype == dtype and student.grad.shape == (2, 3, 10)


# ----------------------------------------------------------------------------- module


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_kdloss_module(device, divergence):
    crit = kdfast.KDLoss(temperature=4.0, alpha=0.1, divergence=divergence, beta=0.4,
                         ignore_index=-1, reduction="sum")
    assert isinstance(crit, torch.nn.Module)
    assert list(crit.parameters()) == []
    student, teacher = logits((6, 20), device=device), logits((6, 20), device=device)
    labels = labels_for((6,), 20, device=device, ignore_index=-1)
    s = student.clone().requires_grad_(True)
    loss = crit(s, teacher, labels)
    loss.backward()
    ref_loss, ref_gs, _ = ref_loss_and_grads(student, teacher, labels, temperature=4.0, alpha=0.1,
                                             divergence=divergence, beta=0.4, ignore_index=-1,
                                             reduction="sum")
    assert_close_fp32(loss, ref_loss, *fp32_tolerances(4.0), "loss")
    assert_grad_close_fp32(s.grad, ref_gs, "grad_student")
    expected = kdfast.kd_loss(student, teacher, labels, temperature=4.0, alpha=0.1,
                              divergence=divergence, beta=0.4, ignore_index=-1, reduction="sum")
    torch.testing.assert_close(loss.detach(), expected, rtol=0, atol=0)
    assert "temperature=4.0" in repr(crit)


def test_kdloss_defaults(device):
    student, teacher = logits((3, 8), device=device), logits((3, 8), device=device)
    torch.testing.assert_close(kdfast.KDLoss()(student, teacher),
                               kdfast.kd_loss(student, teacher), rtol=0, atol=0)


# ----------------------------------------------------------------------------- ignore_index


def test_custom_ignore_index(device):
    student, teacher = logits((6, 12), device=device), logits((6, 12), device=device)
    labels = torch.tensor([0, 3, 0, 11, 5, 0], device=device)
    for reduction in REDUCTIONS:
        check_against_reference(student, teacher, labels, temperature=2.0, alpha=0.3,
                                ignore_index=0, reduction=reduction)
    # Rows labelled 0 are ignored: batchmean divides by the 3 counted rows.
    rows = kdfast.kd_loss(student, teacher, labels, temperature=2.0, alpha=0.3, ignore_index=0,
                          reduction="none")
    assert torch.all(rows[labels == 0] == 0)
    mean = kdfast.kd_loss(student, teacher, labels, temperature=2.0, alpha=0.3, ignore_index=0)
    torch.testing.assert_close(mean, rows.sum() / 3)


def test_labels_with_alpha_zero_still_ignore_rows(device):
    student, teacher = logits((6, 12), device=device), logits((6, 12), device=device)
    labels = torch.tensor([1, -100, 2, -100, -100, 3], device=device)
    loss = kdfast.kd_loss(student, teacher, labels, temperature=2.0)
    ref = ref_kd_loss(student, teacher, labels, temperature=2.0)
    assert_close_fp32(loss, ref, *fp32_tolerances(2.0), "loss")
    unlabelled = kdfast.kd_loss(student[[0, 2, 5]], teacher[[0, 2, 5]], temperature=2.0)
    torch.testing.assert_close(loss, unlabelled, rtol=1e-6, atol=1e-7)
