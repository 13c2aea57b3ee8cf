"""Edge cases with numbers asserted: masked vocabulary (-inf), infinite divergence,
NaN inputs, ignored rows, V == 1, logits of +-1e4."""

from __future__ import annotations

import math

import pytest
import torch
from fp64_reference import ref_kd_loss_rows, ref_loss_and_grads
from kd_helpers import (
    assert_close_fp32,
    assert_grad_close_fp32,
    check_against_reference,
    fp32_tolerances,
    kernel_loss_and_grads,
    logits,
)

import kdfast

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")
REDUCTIONS = ("batchmean", "sum", "none")
INF = math.inf


# ----------------------------------------------------------------------------- masked vocabulary


@pytest.mark.parametrize("temperature", (0.5, 1.0, 4.0))
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_masked_vocabulary_equals_dropped_columns(device, divergence, temperature):
    """-inf in both rows at the same entries: as if those entries did not exist."""
    vocab = 53
    masked = [0, 5, 6, 17, 31, 32, 52]
    keep = [j for j in range(vocab) if j not in masked]
    student, teacher = logits((6, vocab), device=device), logits((6, vocab), device=device)
    student[:, masked] = -INF
    teacher[:, masked] = -INF
    labels = torch.tensor([keep[0], -100, keep[10], keep[-1], 7, -100], device=device)
    s = student.clone().requires_grad_(True)
    t = teacher.clone().requires_grad_(True)
    loss = kdfast.kd_loss(s, t, labels, temperature=temperature, alpha=0.3, divergence=divergence,
                          reduction="none")
    go = torch.randn(6, device=device)
    loss.backward(go)
    assert torch.isfinite(loss).all(), loss
    assert torch.isfinite(s.grad).all() and torch.isfinite(t.grad).all()
    assert torch.all(s.grad[:, masked] == 0) and torch.all(t.grad[:, masked] == 0)
    # Reference on the logits with the masked entries removed (labels re-indexed).
    remap = {j: i for i, j in enumerate(keep)}
    labels_kept = torch.tensor([remap.get(int(y), -100) for y in labels], device=device)
    ref, ref_gs, ref_gt = ref_loss_and_grads(student[:, keep], teacher[:, keep], labels_kept,
                                             grad_output=go.double(), teacher_grad=True,
                                             temperature=temperature, alpha=0.3,
                                             divergence=divergence, reduction="none")
    assert_close_fp32(loss, ref, *fp32_tolerances(temperature), "loss")
    assert_grad_close_fp32(s.grad[:, keep], ref_gs, "grad_student")
    assert_grad_close_fp32(t.grad[:, keep], ref_gt, "grad_teacher")


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16, torch.float16), ids=str)
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_masked_vocabulary_per_row_masks(device, divergence, dtype):
    """Different masks per row (and long enough rows for vector loads), any dtype."""
    vocab = 301
    student = logits((8, vocab), dtype=dtype, device=device)
    teacher = logits((8, vocab), dtype=dtype, device=device)
    mask = torch.rand(8, vocab, device=device) < 0.4
    mask[:, 0] = False  # at least one live entry per row
    student = student.masked_fill(mask, -INF)
    teacher = teacher.masked_fill(mask, -INF)
    labels = torch.zeros(8, dtype=torch.int64, device=device)
    labels[1::3] = -100
    loss, gs, gt = check_against_reference(student, teacher, labels, teacher_grad=True,
                                           temperature=2.0, alpha=0.3, divergence=divergence,
                                           reduction="sum")
    assert torch.isfinite(loss) and torch.isfinite(gs).all() and torch.isfinite(gt).all()
    assert torch.all(gs[mask] == 0) and torch.all(gt[mask] == 0)


def _one_sided_mask(device, side):
    vocab = 40
    student, teacher = logits((4, vocab), device=device), logits((4, vocab), device=device)
    target = student if side == "student" else teacher
    target[2, [3, 9, 20]] = -INF  # row 2 only; the other side keeps mass there
    return student, teacher


@pytest.mark.parametrize("side", ("student", "teacher"))
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_one_sided_mask(device, divergence, side):
    """-inf on one side only. KL(p||q) is inf when q_j = 0 < p_j (student masked), KL(q||p)
    when p_j = 0 < q_j (teacher masked); JSD and the other KL stay finite and exact."""
    student, teacher = _one_sided_mask(device, side)
    infinite = (divergence == "forward_kl" and side == "student") or (
        divergence == "reverse_kl" and side == "teacher")
    rows = kdfast.kd_loss(student, teacher, temperature=2.0, divergence=divergence,
                          reduction="none")
    ref = ref_kd_loss_rows(student, teacher, temperature=2.0, divergence=divergence)
    if infinite:
        assert rows[2] == INF, rows
        assert kdfast.kd_loss(student, teacher, temperature=2.0, divergence=divergence) == INF
        keep = [0, 1, 3]
        assert_close_fp32(rows[keep], ref[keep], *fp32_tolerances(2.0), "finite rows")
        return
    assert torch.isfinite(rows).all(), rows
    go = torch.randn(4, device=device)
    _loss, gs, gt = check_against_reference(student, teacher, None, teacher_grad=True,
                                           grad_output=go, temperature=2.0,
                                           divergence=divergence, reduction="none")
    assert torch.isfinite(gs).all() and torch.isfinite(gt).all()
    if side == "student":
        assert torch.all(gs[2, [3, 9, 20]] == 0)
    else:
        assert torch.all(gt[2, [3, 9, 20]] == 0)


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_fully_masked_row_is_nan(device, divergence):
    """docs/kd_loss_math.md: a row whose maximum is -inf yields NaN, as softmax does."""
    student, teacher = logits((3, 16), device=device), logits((3, 16), device=device)
    student[1] = -INF
    teacher[1] = -INF
    rows = kdfast.kd_loss(student, teacher, divergence=divergence, reduction="none")
    assert torch.isnan(rows[1])
    ref = ref_kd_loss_rows(student, teacher, divergence=divergence)
    assert_close_fp32(rows[[0, 2]], ref[[0, 2]], *fp32_tolerances(1.0), "other rows")


# ----------------------------------------------------------------------------- NaN


@pytest.mark.parametrize("where", ("student", "teacher"))
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_nan_input_gives_nan_loss(device, divergence, where):
    student, teacher = logits((4, 70), device=device), logits((4, 70), device=device)
    (student if where == "student" else teacher)[1, 33] = math.nan
    labels = torch.tensor([3, 4, 5, 6], device=device)
    s = student.clone().requires_grad_(True)
    t = teacher.clone().requires_grad_(True)
    rows = kdfast.kd_loss(s, t, labels, temperature=2.0, alpha=0.3, divergence=divergence,
                          reduction="none")
    assert torch.isnan(rows[1]), rows
    for reduction in ("batchmean", "sum"):
        assert torch.isnan(kdfast.kd_loss(student, teacher, labels, temperature=2.0, alpha=0.3,
                                          divergence=divergence, reduction=reduction))
    rows.backward(torch.ones(4, device=device))  # must not crash or hang
    # The other rows are untouched by the NaN row.
    keep = [0, 2, 3]
    ref, ref_gs, ref_gt = ref_loss_and_grads(student[keep], teacher[keep], labels[keep],
                                             teacher_grad=True, temperature=2.0, alpha=0.3,
                                             divergence=divergence, reduction="none")
    assert_close_fp32(rows[keep], ref, *fp32_tolerances(2.0), "other rows")
    assert_grad_close_fp32(s.grad[keep], ref_gs, "grad_student other rows")
    assert_grad_close_fp32(t.grad[keep], ref_gt, "grad_teacher other rows")


@pytest.mark.parametrize("fill", ("row", "student_row", "teacher_row"))
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_all_nan_row_gives_nan(device, divergence, fill):
    student, teacher = logits((3, 40), device=device), logits((3, 40), device=device)
    if fill in ("row", "student_row"):
        student[1] = math.nan
    if fill in ("row", "teacher_row"):
        teacher[1] = math.nan
    rows = kdfast.kd_loss(student, teacher, divergence=divergence, reduction="none")
    assert torch.isnan(rows[1]), rows
    assert torch.isfinite(rows[[0, 2]]).all(), rows


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_nan_and_inf_in_ignored_row_contribute_nothing(device, divergence):
    student, teacher = logits((4, 70), device=device), logits((4, 70), device=device)
    student[1, 5] = math.nan
    teacher[1, 6] = INF
    student[3] = -INF
    labels = torch.tensor([3, -100, 5, -100], device=device)
    for reduction in REDUCTIONS:
        go = torch.randn(4, device=device) if reduction == "none" else None
        loss, gs, gt = check_against_reference(student, teacher, labels, grad_output=go,
                                               teacher_grad=True, temperature=2.0, alpha=0.3,
                                               divergence=divergence, reduction=reduction)
        assert torch.isfinite(loss).all()
        assert torch.all(gs[[1, 3]] == 0) and torch.all(gt[[1, 3]] == 0)


# ----------------------------------------------------------------------------- ignored rows


@pytest.mark.parametrize("alpha", (0.0, 0.3))
@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_all_rows_ignored(device, divergence, alpha, reduction):
    student = logits((2, 3, 25), device=device, requires_grad=True)
    teacher = logits((2, 3, 25), device=device, requires_grad=True)
    labels = torch.full((2, 3), -100, device=device)
    loss = kdfast.kd_loss(student, teacher, labels, temperature=2.0, alpha=alpha,
                          divergence=divergence, reduction=reduction)
    if reduction == "none":
        assert loss.shape == (2, 3)
        loss.backward(torch.randn(2, 3, device=device))
    else:
        assert loss.shape == ()
        (loss * 2.5).backward()
    assert torch.all(loss.detach() == 0), loss
    assert torch.all(student.grad == 0) and torch.all(teacher.grad == 0)


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_batchmean_counts_only_counted_rows(device, divergence):
    student, teacher = logits((10, 30), device=device), logits((10, 30), device=device)
    labels = torch.tensor([-100] * 7 + [1, 2, 3], device=device)
    rows = kdfast.kd_loss(student, teacher, labels, temperature=2.0, alpha=0.3,
                          divergence=divergence, reduction="none")
    mean = kdfast.kd_loss(student, teacher, labels, temperature=2.0, alpha=0.3,
                          divergence=divergence)
    total = kdfast.kd_loss(student, teacher, labels, temperature=2.0, alpha=0.3,
                           divergence=divergence, reduction="sum")
    torch.testing.assert_close(total, rows.sum(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(mean, rows.sum() / 3, rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------- V == 1


@pytest.mark.parametrize("alpha", (0.0, 0.3))
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_vocab_of_one(device, divergence, alpha):
    student = logits((4, 3, 1), device=device, requires_grad=True)
    teacher = logits((4, 3, 1), device=device, requires_grad=True)
    labels = torch.zeros(4, 3, dtype=torch.int64, device=device)
    labels[0, 1] = -100
    rows = kdfast.kd_loss(student, teacher, labels, temperature=3.0, alpha=alpha,
                          divergence=divergence, reduction="none")
    assert rows.shape == (4, 3)
    torch.testing.assert_close(rows.detach(), torch.zeros(4, 3, device=device), rtol=0,
                               atol=1e-7)
    rows.backward(torch.randn(4, 3, device=device))
    torch.testing.assert_close(student.grad, torch.zeros_like(student), rtol=0, atol=1e-7)
    torch.testing.assert_close(teacher.grad, torch.zeros_like(teacher), rtol=0, atol=1e-7)


# ----------------------------------------------------------------------------- large logits


@pytest.mark.parametrize("temperature", (0.5, 1.0, 3.0, 10.0))
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_logits_of_1e4(device, divergence, temperature):
    """Logits near +-1e4 lose no precision: normalisers are kept relative to the row max,
    so the float32 tolerance of O(1) logits still holds."""
    vocab = 203
    student = logits((5, vocab), device=device)
    teacher = logits((5, vocab), device=device)
    student[0] += 1e4
    teacher[0] += 1e4  # both rows shifted up
    student[1] -= 1e4
    teacher[1] += 1e4  # opposite shifts
    student[2, ::3] += 1e4  # a third of the entries near +1e4, a third of the teacher's near -1e4
    teacher[2, ::3] += 1e4
    teacher[2, 1::3] = -1e4
    student[3] -= 1e4
    teacher[3] -= 1e4
    student[4, 100:] = -1e4  # a block of the vocabulary at -1e4 in both rows
    teacher[4, 100:] = -1e4
    labels = torch.tensor([4, 5, 6, 17, 8], device=device)  # CE on logits near +-1e4 too
    loss, gs, gt = check_against_reference(student, teacher, labels, teacher_grad=True,
                                           grad_output=torch.randn(5, device=device),
                                           temperature=temperature, alpha=0.3,
                                           divergence=divergence, reduction="none")
    assert torch.isfinite(loss).all() and torch.isfinite(gs).all() and torch.isfinite(gt).all()


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_cross_entropy_term_of_1e4_logits(device, divergence):
    """alpha = 1: the loss is cross_entropy(student, labels), which float32 torch gets to
    ~1e-7 for logits near 1e4; log-sum-exp must not be formed as max + log_z first."""
    student = logits((6, 203), device=device) + 1e4
    teacher = logits((6, 203), device=device)
    labels = torch.tensor([0, 5, 50, 100, 150, 202], device=device)
    rows = kdfast.kd_loss(student, teacher, labels, alpha=1.0, divergence=divergence,
                          reduction="none")
    expected = torch.nn.functional.cross_entropy(student.double(), labels, reduction="none")
    assert_close_fp32(rows, expected, rtol=1e-5, atol=1e-6, what="cross-entropy term")


@pytest.mark.parametrize("temperature", (0.5, 3.0))
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_logits_of_1e4_disjoint_support(device, divergence, temperature):
    """Student and teacher put their mass 1e4 apart: divergences of ~1e4 / T whose
    gradients are differences of two ~1e4 / T numbers (log ratio minus KL). float32
    cannot resolve those better than eps32 * |row loss| / T (eager float32 PyTorch
    does no better), so the gradient tolerance is set by that condition number."""
    vocab = 203
    student = logits((3, vocab), device=device)
    teacher = logits((3, vocab), device=device)
    student[0, 17] = 1e4  # one dominating entry each, at different places
    teacher[0, 18] = 1e4
    student[1] *= 3000  # spread over +-1e4
    teacher[1] *= 3000
    student[2, 100:] = -1e4  # disjoint halves
    teacher[2, :100] = -1e4
    labels = torch.tensor([17, 5, 150], device=device)
    go = torch.rand(3, device=device) + 0.5
    loss, gs, gt = kernel_loss_and_grads(student, teacher, labels, grad_output=go,
                                         teacher_grad=True, temperature=temperature, alpha=0.3,
                                         divergence=divergence, reduction="none")
    ref, ref_gs, ref_gt = ref_loss_and_grads(student, teacher, labels, grad_output=go.double(),
                                             teacher_grad=True, temperature=temperature,
                                             alpha=0.3, divergence=divergence, reduction="none")
    assert torch.isfinite(loss).all() and torch.isfinite(gs).all() and torch.isfinite(gt).all()
    assert_close_fp32(loss, ref, rtol=1e-5, atol=1e-6, what="loss")
    eps = torch.finfo(torch.float32).eps
    for r in range(3):
        atol = 8 * eps * float(ref[r].abs() + 1) * float(go[r]) / temperature
        assert_close_fp32(gs[r], ref_gs[r], rtol=1e-4, atol=atol, what=f"grad_student row {r}")
        assert_close_fp32(gt[r], ref_gt[r], rtol=1e-4, atol=atol, what=f"grad_teacher row {r}")


@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16), ids=str)
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_logits_of_1e4_low_precision(device, divergence, dtype):
    student = logits((4, 96), device=device)
    teacher = logits((4, 96), device=device)
    student[0] += 1e4
    teacher[1] -= 1e4
    student[2, ::5] = -1e4
    teacher[3, 7] = 1e4
    check_against_reference(student.to(dtype), teacher.to(dtype),
                            torch.tensor([1, 2, -100, 7], device=device), teacher_grad=True,
                            temperature=2.0, alpha=0.3, divergence=divergence, reduction="sum")


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_shift_invariance(device, divergence):
    """softmax is shift invariant: adding 8192 (exact in float32) changes nothing."""
    student, teacher = logits((5, 77), device=device), logits((5, 77), device=device)
    student = (student * 64).round() / 64  # exactly representable after the shift too
    teacher = (teacher * 64).round() / 64
    a = kdfast.kd_loss(student, teacher, temperature=2.0, divergence=divergence, reduction="none")
    b = kdfast.kd_loss(student + 8192, teacher - 8192, temperature=2.0, divergence=divergence,
                       reduction="none")
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
