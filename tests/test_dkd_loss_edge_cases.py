"""dkd_loss edge cases: masked (-inf) classes and targets, rows with no non-target
distribution, a certain teacher (non-target mass below float32's range, with and without
flush-to-zero), very large and small temperatures, V = 2, NaN / +inf inputs, large
logit offsets."""

from __future__ import annotations

import math

import pytest
import torch
from dkd_helpers import REDUCTIONS, check_dkd, labels_for, logits, ref_dkd_and_grads, run_dkd

import kdfast

pytestmark = pytest.mark.usefixtures("needs_extension")

INF = math.inf


@pytest.fixture(params=[False, True], ids=["denormals", "flush_to_zero"])
def flush_denormal(request):
    previous = torch.set_flush_denormal(request.param)
    del previous
    yield request.param
    torch.set_flush_denormal(False)


def _fp16_recompute(student, teacher, labels, **options):
    """(loss, grad_student, grad_teacher) through the recomputing backward (float16)."""
    return run_dkd(student.half(), teacher.half(), labels, teacher_grad=True, **options)


# ----------------------------------------------------------------------------- masked classes


@pytest.mark.parametrize("temperature", [0.5, 4.0])
def test_masked_classes_equal_dropped_columns(device, temperature):
    """-inf in both inputs at the same non-target entries: as if they did not exist."""
    vocab = 53
    masked = [0, 5, 6, 17, 31, 32, 52]
    keep = [j for j in range(vocab) if j not in masked]
    student, teacher = logits((6, vocab), device=device), logits((6, vocab), device=device)
    student[:, masked] = -INF
    teacher[:, masked] = -INF
    labels = torch.tensor([keep[0], -100, keep[10], keep[-1], 7, 33], device=device)
    go = torch.randn(6, device=device)
    loss, gs, gt = run_dkd(student, teacher, labels, grad_output=go, teacher_grad=True,
                           temperature=temperature, reduction="none")
    assert torch.isfinite(loss).all() and torch.isfinite(gs).all() and torch.isfinite(gt).all()
    assert torch.all(gs[:, masked] == 0) and torch.all(gt[:, masked] == 0)
    remap = {j: i for i, j in enumerate(keep)}
    labels_kept = torch.tensor([remap.get(int(y), -100) for y in labels], device=device)
    ref, ref_gs, ref_gt = ref_dkd_and_grads(student[:, keep], teacher[:, keep], labels_kept,
                                            grad_output=go, teacher_grad=True,
                                            temperature=temperature, reduction="none")
    torch.testing.assert_close(loss.cpu().double(), ref, rtol=2e-5, atol=1e-5)
    torch.testing.assert_close(gs[:, keep].cpu().double(), ref_gs, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(gt[:, keep].cpu().double(), ref_gt, rtol=1e-4, atol=1e-6)
    # The recomputing backward (float16) agrees.
    _, gs16, gt16 = _fp16_recompute(student, teacher, labels, temperature=temperature,
                                    reduction="none")
    assert torch.all(gs16[:, masked] == 0) and torch.all(gt16[:, masked] == 0)
    assert torch.isfinite(gs16).all() and torch.isfinite(gt16).all()


def test_masked_target_in_both(device):
    """Target -inf in both inputs: b_1 = 0 on both sides, TCKD = 0, only NCKD remains."""
    student, teacher = logits((5, 40), device=device), logits((5, 40), device=device)
    labels = torch.tensor([0, 3, 17, 39, 20], device=device)
    rows = torch.arange(5, device=device)
    student[rows, labels] = -INF
    teacher[rows, labels] = -INF
    loss, gs, gt = check_dkd(student, teacher, labels, teacher_grad=True, reduction="none")
    assert torch.isfinite(loss).all()
    assert torch.all(gs[rows, labels] == 0) and torch.all(gt[rows, labels] == 0)
    nckd_only = run_dkd(student, teacher, labels, alpha=0.0, reduction="none")[0]
    torch.testing.assert_close(loss, nckd_only, rtol=1e-6, atol=1e-6)


def test_target_masked_in_student_only_is_infinite(device):
    """The teacher puts mass on a target the student masks: KL(b_t || b_s) = +inf."""
    student, teacher = logits((3, 20), device=device), logits((3, 20), device=device)
    labels = torch.tensor([2, 5, 19], device=device)
    student[0, 2] = -INF
    loss = run_dkd(student, teacher, labels, reduction="none")[0]
    assert loss[0] == INF and torch.isfinite(loss[1:]).all()
    # The reverse (teacher masks the target, the student does not) is finite.
    teacher[1, 5] = -INF
    loss = check_dkd(student[1:], teacher[1:], labels[1:], teacher_grad=True,
                     reduction="none")[0]
    assert torch.isfinite(loss).all()


def test_no_non_target_distribution_is_nan(device):
    """A row whose non-target classes are all -inf in an input has no p~: NaN loss and
    gradient for that row only."""
    student, teacher = logits((4, 9), device=device), logits((4, 9), device=device)
    labels = torch.tensor([3, 0, 8, 4], device=device)
    teacher[1, 1:] = -INF       # teacher: only the target left
    student[2, :8] = -INF       # student: only the target left
    for loss, gs, gt in (run_dkd(student, teacher, labels, teacher_grad=True, reduction="none"),
                         _fp16_recompute(student, teacher, labels, reduction="none")):
        assert torch.isnan(loss[1:3]).all() and torch.isfinite(loss[[0, 3]]).all()
        assert torch.isnan(gs[1:3]).all() and torch.isnan(gt[1:3]).all()
        assert torch.isfinite(gs[[0, 3]]).all() and torch.isfinite(gt[[0, 3]]).all()
    check_dkd(student[[0, 3]], teacher[[0, 3]], labels[[0, 3]], teacher_grad=True)
    assert torch.isnan(kdfast.dkd_loss(student, teacher, labels))


# ----------------------------------------------------------------------------- certain teacher


@pytest.mark.parametrize("margin", [30.0, 120.0, 400.0])
def test_certain_teacher(device, margin, flush_denormal):
    """The teacher's target logit far above the rest (p_y -> 1; at T = 1 the non-target
    mass e^-margin is far below float32's range): NCKD still sees the exact non-target
    distribution; loss and gradients stay finite and match float64."""
    student, teacher = logits((6, 77), device=device), logits((6, 77), device=device)
    labels = torch.tensor([0, 5, 16, 40, 76, 31], device=device)
    rows = torch.arange(6, device=device)
    teacher[rows, labels] += margin
    for temperature in (1.0, 4.0):
        loss, gs, gt = check_dkd(student, teacher, labels, teacher_grad=True,
                                 temperature=temperature, reduction="none")
        assert torch.isfinite(loss).all() and torch.isfinite(gs).all() and torch.isfinite(gt).all()
        # NCKD alone is as large as for an uncertain teacher with the same non-target logits.
        nckd = run_dkd(student, teacher, labels, alpha=0.0, beta=1.0, temperature=temperature,
                       reduction="none")[0]
        assert torch.all(nckd > 0.01)
    # Student certain too: TCKD -> 0, both b_2 tiny.
    student[rows, labels] += margin
    check_dkd(student, teacher, labels, teacher_grad=True, temperature=1.0, reduction="none")


# ----------------------------------------------------------------------------- temperatures


@pytest.mark.parametrize("temperature", [1e-3, 0.01, 0.1, 10.0, 100.0])
def test_extreme_temperatures_match_reference(device, temperature):
    student, teacher = logits((5, 300), device=device), logits((5, 300), device=device)
    labels = labels_for((5,), 300, device=device)
    loss, gs, gt = check_dkd(student, teacher, labels, teacher_grad=True,
                             temperature=temperature, reduction="none")
    assert torch.isfinite(loss).all() and torch.isfinite(gs).all() and torch.isfinite(gt).all()


@pytest.mark.parametrize("temperature", [1e3, 1e4])
def test_very_large_temperature(device, temperature):
    """T^2 times a divergence of order 1/T^2: float32 rounding of the probabilities (relative
    eps) against differences of order 1/T limits the precision, so the errors grow with T.
    They stay well inside eager float32 PyTorch's (whose loss is off by percents at T=1e3),
    within the bounds below; float64 is tight."""
    vocab = 300
    student, teacher = logits((4, vocab), device=device), logits((4, vocab), device=device)
    labels = labels_for((4,), vocab, device=device)
    loss, gs, gt = check_dkd(student, teacher, labels, teacher_grad=True, eager_rule=True,
                             temperature=temperature, reduction="none")
    ref, ref_gs, ref_gt = ref_dkd_and_grads(student, teacher, labels, teacher_grad=True,
                                            temperature=temperature, reduction="none")
    loss_err = float((loss.cpu().double() - ref).abs().max() / ref.abs().max())
    assert loss_err <= 1e-9 * temperature**2, loss_err
    for g, ref_g in ((gs, ref_gs), (gt, ref_gt)):
        scale = float(ref_g.abs().max())
        torch.testing.assert_close(g.cpu().double(), ref_g, rtol=0, atol=5e-8 * temperature * scale)
    check_dkd(student.double(), teacher.double(), labels, teacher_grad=True,
              temperature=temperature, reduction="none")


# ----------------------------------------------------------------------------- V = 2


@pytest.mark.parametrize("temperature", [0.5, 4.0])
def test_two_classes_is_binary_kl(device, temperature):
    """V = 2: the non-target distribution is a point mass (NCKD = 0), and TCKD is the KL
    of two Bernoulli distributions with p = sigmoid((x_y - x_other) / T)."""
    student, teacher = logits((8, 2), device=device), logits((8, 2), device=device)
    labels = torch.tensor([0, 1, 1, 0, -100, 1, 0, 1], device=device)
    loss = check_dkd(student, teacher, labels, teacher_grad=True, temperature=temperature,
                     reduction="none")[0]
    counted = labels != -100
    y = labels[counted].cpu()
    s, t = student[counted].cpu().double(), teacher[counted].cpu().double()
    idx = torch.arange(len(y))
    p = torch.sigmoid((t[idx, y] - t[idx, 1 - y]) / temperature)
    q = torch.sigmoid((s[idx, y] - s[idx, 1 - y]) / temperature)
    binary_kl = p * (p / q).log() + (1 - p) * ((1 - p) / (1 - q)).log()
    torch.testing.assert_close(loss[counted].cpu().double(), temperature**2 * binary_kl,
                               rtol=2e-5, atol=1e-6)
    nckd = run_dkd(student, teacher, labels, alpha=0.0, teacher_grad=True, reduction="none")
    assert torch.all(nckd[0] == 0) and torch.all(nckd[1] == 0) and torch.all(nckd[2] == 0)


# ----------------------------------------------------------------------------- NaN / inf


def test_nan_and_inf_rows(device):
    student, teacher = logits((6, 33), device=device), logits((6, 33), device=device)
    labels = torch.tensor([4, 4, 4, -100, 4, 4], device=device)
    student[1, 20] = float("nan")   # NaN in a non-target class
    teacher[2, 4] = float("nan")    # NaN target
    student[3, 0] = float("nan")    # ignored row: contributes 0, gradient 0
    teacher[4, 9] = INF             # +inf: no softmax
    student[5, 4] = INF             # +inf target
    bad, good = [1, 2, 4, 5], [0]
    for loss, gs, gt in (run_dkd(student, teacher, labels, teacher_grad=True, reduction="none"),
                         _fp16_recompute(student, teacher, labels, reduction="none")):
        assert torch.isnan(loss[bad]).all(), loss
        assert torch.isnan(gs[bad]).all() and torch.isnan(gt[bad]).all()
        assert loss[3] == 0 and torch.all(gs[3] == 0) and torch.all(gt[3] == 0)
        assert torch.isfinite(loss[good]).all() and torch.isfinite(gs[good]).all()
    check_dkd(student[good], teacher[good], labels[good], teacher_grad=True)
    for reduction in ("batchmean", "sum"):
        assert torch.isnan(kdfast.dkd_loss(student, teacher, labels, reduction=reduction))


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_large_offsets_keep_precision(device, reduction):
    """Logits around +-1e4: the max is subtracted before the temperature, so the loss is
    that of the logits' differences."""
    student, teacher = logits((4, 64), device=device), logits((4, 64), device=device)
    offsets = torch.tensor([1e4, -1e4, 3e3, 0.0], device=device)[:, None]
    labels = labels_for((4,), 64, device=device, ignore_every=0)
    check_dkd(student + offsets, teacher - offsets, labels, teacher_grad=True, reduction=reduction,
              temperature=2.0)
