"""kdfast.dkd_loss / kdfast.DKDLoss against the independent float64 reference
(tests/dkd_helpers.py): loss and both gradients over awkward shapes, every dtype pair,
non-contiguous views, every reduction, ignore_index, alpha / beta / temperature variety,
target positions on vector boundaries, and the commonly published DKD formulation."""

from __future__ import annotations

import pytest
import torch
from dkd_helpers import (
    DTYPE_PAIRS,
    REDUCTIONS,
    check_dkd,
    labels_for,
    logits,
    pair_id,
    published_dkd,
    ref_dkd,
    run_dkd,
)

import kdfast

pytestmark = pytest.mark.usefixtures("needs_extension")

SHAPES = [
    (1, 2),        # V = 2: one non-target class
    (4, 2),
    (3, 3),
    (5, 17),       # odd V, not a multiple of 16 / 32
    (6, 31),
    (4, 33),
    (3, 65),
    (2, 129),
    (2, 1000),
    (1, 5000),     # single row
    (2, 3, 301),   # 3-D
    (2, 2, 2, 47),
]

OPTIONS = [
    dict(),  # alpha=1, beta=8, T=4
    dict(alpha=0.5, beta=2.0, temperature=1.0),
    dict(alpha=0.0, beta=1.0, temperature=2.0),
    dict(alpha=1.0, beta=0.0, temperature=2.0),
    dict(alpha=2.0, beta=0.5, temperature=0.5),
    dict(alpha=1.0, beta=8.0, temperature=20.0),
]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_shapes_match_reference(device, shape):
    student, teacher = logits(shape, device=device), logits(shape, device=device)
    labels = labels_for(shape[:-1], shape[-1], device=device)
    for reduction in REDUCTIONS:
        check_dkd(student, teacher, labels, teacher_grad=True, reduction=reduction)
    check_dkd(student, teacher, labels, teacher_grad=False)


@pytest.mark.parametrize("options", OPTIONS,
                         ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "default")
def test_options_match_reference(device, options):
    student, teacher = logits((7, 257), device=device), logits((7, 257), device=device)
    labels = labels_for((7,), 257, device=device)
    check_dkd(student, teacher, labels, teacher_grad=True, **options)
    check_dkd(student.double(), teacher.double(), labels, teacher_grad=True, **options)


@pytest.mark.parametrize("dtypes", DTYPE_PAIRS, ids=pair_id)
@pytest.mark.parametrize("shape", [(6, 37), (2, 3, 1000)], ids=lambda s: "x".join(map(str, s)))
def test_dtype_pairs_match_reference(device, dtypes, shape):
    s_dtype, t_dtype = dtypes
    student = logits(shape, dtype=s_dtype, device=device)
    teacher = logits(shape, dtype=t_dtype, device=device)
    labels = labels_for(shape[:-1], shape[-1], device=device)
    for reduction in REDUCTIONS:
        go = torch.randn(shape[:-1], device=device) if reduction == "none" else None
        check_dkd(student, teacher, labels, grad_output=go, teacher_grad=True,
                  reduction=reduction, temperature=2.0)
    check_dkd(student, teacher, labels, teacher_grad=False, alpha=0.5, beta=4.0)


def test_float64_matches_reference_tightly(device):
    student = logits((5, 3, 71), dtype=torch.float64, device=device)
    teacher = logits((5, 3, 71), dtype=torch.float64, device=device)
    labels = labels_for((5, 3), 71, device=device)
    for reduction in REDUCTIONS:
        check_dkd(student, teacher, labels, teacher_grad=True, reduction=reduction,
                  alpha=1.5, beta=3.0, temperature=3.0)


def _views(device):
    """(name, student, teacher, labels) with non-contiguous inputs."""
    out = []
    base_s, base_t = logits((3, 6, 45), device=device), logits((3, 6, 45), device=device)
    y = labels_for((3, 6), 45, device=device)
    out.append(("slice_rows", base_s[:, :-1, :], base_t[:, :-1, :], y[:, :-1]))
    out.append(("slice_teacher_only", base_s[:, 1:, :].contiguous(), base_t[:, 1:, :], y[:, 1:]))
    out.append(("transposed_leading", base_s.transpose(0, 1), base_t.transpose(0, 1),
                y.transpose(0, 1)))
    out.append(("strided_vocab", base_s[..., ::2], base_t[..., ::2],
                labels_for((3, 6), 23, device=device)))
    wide_s, wide_t = logits((5, 90), device=device), logits((5, 90), device=device)
    out.append(("column_slice", wide_s[:, 3:50], wide_t[:, 40:87], labels_for((5,), 47, device=device)))
    out.append(("transposed_2d", logits((33, 4), device=device).t(), logits((33, 4), device=device).t(),
                labels_for((4,), 33, device=device)))
    four_s, four_t = logits((2, 3, 4, 19), device=device), logits((2, 3, 4, 19), device=device)
    out.append(("permuted_4d", four_s.permute(2, 0, 1, 3), four_t.permute(2, 0, 1, 3),
                labels_for((2, 3, 4), 19, device=device).permute(2, 0, 1)))
    return out


@pytest.mark.parametrize("which", range(7))
def test_non_contiguous_inputs(device, which):
    name, student, teacher, labels = _views(device)[which]
    if student.shape != teacher.shape:
        teacher = logits(student.shape, device=device)
    assert not (student.is_contiguous() and teacher.is_contiguous()), name
    for reduction in REDUCTIONS:
        check_dkd(student, teacher, labels, teacher_grad=True, reduction=reduction)
    # Same numbers as the contiguous copies.
    a = run_dkd(student, teacher, labels, teacher_grad=True, reduction="none")
    b = run_dkd(student.contiguous(), teacher.contiguous(), labels.contiguous(), teacher_grad=True,
                reduction="none")
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=0, atol=0)


@pytest.mark.parametrize("ignore_index", [-100, -1, 7])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_ignore_index(device, reduction, ignore_index):
    student, teacher = logits((9, 40), device=device), logits((9, 40), device=device)
    labels = labels_for((9,), 40, device=device, ignore_every=2, ignore_index=ignore_index)
    if ignore_index == 7:  # 7 is also a valid class: rows labelled 7 are skipped
        labels[0] = 7
    loss, gs, gt = check_dkd(student, teacher, labels, teacher_grad=True, reduction=reduction,
                             ignore_index=ignore_index)
    ignored = labels == ignore_index
    assert torch.all(gs[ignored] == 0) and torch.all(gt[ignored] == 0)
    assert torch.all(gs[~ignored].abs().sum(-1) > 0)
    if reduction == "none":
        assert torch.all(loss[ignored] == 0)
    if reduction == "batchmean":  # the mean over counted rows only
        total = run_dkd(student, teacher, labels, reduction="sum", ignore_index=ignore_index)[0]
        torch.testing.assert_close(loss, total / int((~ignored).sum()))


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_all_rows_ignored(device, reduction):
    student, teacher = logits((4, 19), device=device), logits((4, 19), device=device)
    student[0, 3] = float("nan")  # ignored rows never reach the result
    labels = torch.full((4,), -100, device=device)
    loss, gs, gt = run_dkd(student, teacher, labels, teacher_grad=True, reduction=reduction)
    assert torch.all(loss == 0) and loss.shape == (() if reduction != "none" else (4,))
    assert torch.all(gs == 0) and torch.all(gt == 0)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_zero_rows(device, reduction):
    student, teacher = logits((0, 11), device=device), logits((0, 11), device=device)
    labels = torch.zeros(0, dtype=torch.int64, device=device)
    loss, gs, gt = run_dkd(student, teacher, labels, teacher_grad=True, reduction=reduction)
    assert loss.shape == ((0,) if reduction == "none" else ())
    assert torch.all(loss == 0)
    assert gs.shape == (0, 11) and gt.shape == (0, 11)


@pytest.mark.parametrize("vocab", [2, 3, 16, 17, 32, 33, 64, 100])
def test_target_on_vector_boundaries(device, vocab):
    """Targets at 0, V-1 and around every 8 / 16 / 32-lane boundary (the target lane is
    left out of the vectorised sums)."""
    candidates = sorted({0, vocab - 1, *(b + d for b in (8, 16, 32, 48, 64) for d in (-1, 0, 1))})
    targets = [y for y in candidates if 0 <= y < vocab]
    student = logits((len(targets), vocab), device=device)
    teacher = logits((len(targets), vocab), device=device)
    labels = torch.tensor(targets, device=device)
    check_dkd(student, teacher, labels, teacher_grad=True, reduction="none")
    check_dkd(student, teacher, labels, teacher_grad=False, temperature=1.0)
    # The largest logit on the target (non-target max differs from the row max).
    student[torch.arange(len(targets)), labels] += 20
    teacher[torch.arange(len(targets)), labels] += 25
    check_dkd(student, teacher, labels, teacher_grad=True, reduction="none")


def test_integer_label_dtypes(device):
    student, teacher = logits((6, 21), device=device), logits((6, 21), device=device)
    labels = labels_for((6,), 21, device=device, ignore_every=0)
    want = run_dkd(student, teacher, labels)[0]
    for dtype in (torch.int32, torch.int16, torch.uint8):
        torch.testing.assert_close(run_dkd(student, teacher, labels.to(dtype))[0], want, rtol=0, atol=0)


def test_module_matches_function(device):
    student, teacher = logits((5, 3, 29), device=device), logits((5, 3, 29), device=device)
    labels = labels_for((5, 3), 29, device=device)
    crit = kdfast.DKDLoss(alpha=0.7, beta=3.0, temperature=2.5, reduction="sum")
    assert "alpha=0.7" in repr(crit) and "reduction='sum'" in repr(crit)
    a = run_dkd(student, teacher, labels, teacher_grad=True, fn=crit)
    b = run_dkd(student, teacher, labels, teacher_grad=True, alpha=0.7, beta=3.0,
                temperature=2.5, reduction="sum")
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=0, atol=0)
    check_dkd(student, teacher, labels, teacher_grad=True, fn=kdfast.DKDLoss())


def test_defaults_are_the_papers(device):
    """alpha=1, beta=8, T=4, batchmean."""
    student, teacher = logits((4, 50), device=device), logits((4, 50), device=device)
    labels = labels_for((4,), 50, device=device, ignore_every=0)
    got = kdfast.dkd_loss(student, teacher, labels)
    want = ref_dkd(student.cpu().double(), teacher.cpu().double(), labels.cpu(), alpha=1.0,
                   beta=8.0, temperature=4.0)
    torch.testing.assert_close(got.cpu().double(), want, rtol=2e-5, atol=1e-5)


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_agrees_with_published_formulation(device, temperature):
    """The common formulation (masked sums of the softmax; a 1000 offset on the target
    logit for the non-target softmax) on ordinary inputs."""
    student, teacher = logits((16, 100), device=device), logits((16, 100), device=device)
    labels = torch.randint(0, 100, (16,), device=device)
    s = student.clone().requires_grad_(True)
    t = teacher.clone().requires_grad_(True)
    loss = kdfast.dkd_loss(s, t, labels, alpha=1.0, beta=8.0, temperature=temperature)
    loss.backward()
    s64 = student.cpu().double().requires_grad_(True)
    t64 = teacher.cpu().double().requires_grad_(True)
    want = published_dkd(s64, t64, labels.cpu(), alpha=1.0, beta=8.0, temperature=temperature)
    want.backward()
    torch.testing.assert_close(loss.cpu().double(), want.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s.grad.cpu().double(), s64.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(t.grad.cpu().double(), t64.grad, rtol=1e-4, atol=1e-6)


def test_reference_module_matches_fp64(device):
    """kdfast.reference.dkd_loss (the fallback) against the independent float64 reference."""
    for dtypes in [(torch.float32, torch.float32), (torch.bfloat16, torch.float32)]:
        student = logits((7, 45), dtype=dtypes[0], device=device)
        teacher = logits((7, 45), dtype=dtypes[1], device=device)
        labels = labels_for((7,), 45, device=device)
        for reduction in REDUCTIONS:
            check_dkd(student, teacher, labels, teacher_grad=True, fn=kdfast.reference.dkd_loss,
                      reduction=reduction, alpha=0.5, beta=2.0, temperature=2.0)


_FALLBACK_CHILD = """
import sys, warnings
sys.path[:0] = [{root!r}, {tests!r}]
import torch
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import kdfast
    from test_dkd_loss import fallback_cases
    results = fallback_cases()
torch.save(dict(results=results, has_extension=kdfast.has_extension(),
                warnings=[str(w.message) for w in caught if "reference" in str(w.message)]),
           sys.argv[1])
"""


def fallback_cases():
    """Loss and gradients of a few calls (also run by the fallback subprocess)."""
    out = []
    for i, (shape, dtypes, options) in enumerate([
            ((6, 37), ("float32", "float32"), dict()),
            ((2, 3, 65), ("bfloat16", "float32"), dict(alpha=0.5, beta=2.0, reduction="none")),
            ((5, 2), ("float32", "float32"), dict(temperature=1.0, reduction="sum"))]):
        g = torch.Generator().manual_seed(10 + i)
        s = (torch.randn(shape, generator=g) * 3).to(getattr(torch, dtypes[0])).requires_grad_(True)
        t = (torch.randn(shape, generator=g) * 3).to(getattr(torch, dtypes[1])).requires_grad_(True)
        y = torch.randint(0, shape[-1], shape[:-1], generator=g)
        y.view(-1)[::3] = -100
        loss = kdfast.dkd_loss(s, t, y, **options)
        loss.backward(torch.full_like(loss, 1.7))
        out.append((loss.detach(), s.grad, t.grad))
    return out


def test_fallback_without_extension_matches_kernels(tmp_path):
    """KDFAST_DISABLE_EXTENSION=1: kdfast.dkd_loss runs the plain-PyTorch reference (one
    warning) and gives the kernels' numbers."""
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    tests = os.path.dirname(os.path.abspath(__file__))
    path = tmp_path / "fallback.pt"
    proc = subprocess.run([sys.executable, "-c", _FALLBACK_CHILD.format(root=root, tests=tests),
                           str(path)], env=dict(os.environ, KDFAST_DISABLE_EXTENSION="1"),
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    child = torch.load(path)
    assert child["has_extension"] is False and len(child["warnings"]) == 1, child["warnings"]
    for case, (fb, ext) in enumerate(zip(child["results"], fallback_cases())):
        for what, a, b in zip(("loss", "grad_student", "grad_teacher"), fb, ext):
            assert a.dtype == b.dtype and a.shape == b.shape, (case, what)
            tol = dict(rtol=2e-5, atol=2e-6) if a.dtype == torch.float32 else {}
            torch.testing.assert_close(a, b, **tol, msg=lambda m, c=case, w=what: f"{c} {w}: {m}")
