"""kdfast.feature_loss / kdfast.FeatureLoss against the independent float64 reference
(tests/feature_helpers.py): every kind x normalize x reduction x mask, awkward shapes,
zero rows, every dtype pair, non-contiguous views, zero and tiny vectors, NaN."""

from __future__ import annotations

import pytest
import torch
from feature_helpers import (
    KINDS,
    REDUCTIONS,
    assert_grad_close,
    assert_loss_close,
    check_feature,
    check_views,
    features,
    random_mask,
    ref_feature_loss,
    ref_loss_and_grads,
)
from kd_helpers import DTYPE_PAIRS, pair_id

import kdfast

pytestmark = pytest.mark.usefixtures("needs_extension")

MASKS = ("none", "some", "all", "no_rows")


def _mask(how: str, rows_shape, device):
    if how == "none":
        return None
    if how == "some":
        return random_mask(rows_shape, device)
    return torch.full(tuple(rows_shape), how == "all", dtype=torch.bool, device=device)


@pytest.mark.parametrize("mask", MASKS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("normalize", (False, True), ids=("raw", "normalize"))
@pytest.mark.parametrize("kind", KINDS)
def test_matches_reference(device, kind, normalize, reduction, mask):
    shape = (4, 5, 37)
    s, t = features(shape, device=device), features(shape, device=device)
    m = _mask(mask, shape[:-1], device)
    go = torch.rand(shape[:-1], device=device) + 0.5 if reduction == "none" else None
    loss, gs, gt = check_feature(s, t, kind=kind, normalize=normalize, mask=m, reduction=reduction,
                                 grad_output=go)
    if mask == "no_rows":
        assert torch.all(loss == 0) and torch.all(gs == 0) and torch.all(gt == 0)
    if m is not None:  # unselected rows: exactly zero loss and gradients
        assert torch.all(gs[~m] == 0) and torch.all(gt[~m] == 0)
        if reduction == "none":
            assert torch.all(loss[~m] == 0)


@pytest.mark.parametrize("kind", KINDS)
def test_none_sums_to_sum_and_mean_divisor(device, kind):
    shape = (6, 4, 23)
    s, t = features(shape, device=device), features(shape, device=device)
    m = random_mask(shape[:-1], device)
    with torch.no_grad():
        rows = kdfast.feature_loss(s, t, kind=kind, mask=m, reduction="none")
        total = kdfast.feature_loss(s, t, kind=kind, mask=m, reduction="sum")
        mean = kdfast.feature_loss(s, t, kind=kind, mask=m, reduction="mean")
    torch.testing.assert_close(rows.sum(), total, rtol=1e-6, atol=1e-6)
    divisor = int(m.sum()) * (1 if kind == "cosine" else shape[-1])
    torch.testing.assert_close(mean, total / divisor, rtol=1e-6, atol=1e-7)


SHAPES = [(6, 1), (5, 3), (7, 17), (3, 4101), (2, 3, 4, 9), (2, 1, 3, 2, 5), (1, 64)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("normalize", (False, True), ids=("raw", "normalize"))
@pytest.mark.parametrize("kind", KINDS)
def test_awkward_shapes(device, kind, normalize, shape):
    s, t = features(shape, device=device), features(shape, device=device)
    m = random_mask(shape[:-1], device) if len(shape) > 2 else None
    if shape[-1] == 1 and (normalize or kind == "cosine"):
        return _check_sign_only(s, t, kind, normalize)
    check_feature(s, t, kind=kind, normalize=normalize, mask=m)
    check_feature(s, t, kind=kind, normalize=normalize, mask=m, reduction="none",
                  grad_output=torch.rand(shape[:-1], device=device))


def _check_sign_only(s, t, kind, normalize):
    """D = 1 normalised, or cosine: the loss depends on the signs only, the exact gradient
    is 0 and a float32 one is rounding noise of the terms that cancel, ~eps / |x|."""
    s_k = s.detach().clone().requires_grad_(True)
    t_k = t.detach().clone().requires_grad_(True)
    loss = kdfast.feature_loss(s_k, t_k, kind=kind, normalize=normalize, reduction="sum")
    loss.backward()
    assert_loss_close(loss, ref_feature_loss(s, t, kind=kind, normalize=normalize, reduction="sum"),
                      s.dtype)
    noise = 1e-6 * (1 / s.abs() + 1 / t.abs())
    assert torch.all(s_k.grad.abs() <= noise) and torch.all(t_k.grad.abs() <= noise)


@pytest.mark.parametrize("shape", [(0, 17), (2, 0, 5), (0, 1)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("kind", KINDS)
def test_zero_rows(device, kind, reduction, shape):
    for normalize in (False, True):
        s, t = features(shape, device=device), features(shape, device=device)
        mask = torch.ones(shape[:-1], dtype=torch.bool, device=device)
        for m in (None, mask):
            loss, gs, gt = check_feature(s, t, kind=kind, normalize=normalize, mask=m,
                                         reduction=reduction)
            assert loss.shape == (shape[:-1] if reduction == "none" else ())
            assert gs.shape == s.shape and gt.shape == t.shape and gs.numel() == 0
            if reduction != "none":
                assert float(loss) == 0.0


@pytest.mark.parametrize("dtypes", DTYPE_PAIRS, ids=pair_id)
@pytest.mark.parametrize("normalize", (False, True), ids=("raw", "normalize"))
@pytest.mark.parametrize("kind", KINDS)
def test_dtype_pairs(device, kind, normalize, dtypes):
    shape = (5, 3, 65)
    s = features(shape, dtypes[0], device)
    t = features(shape, dtypes[1], device)
    m = random_mask(shape[:-1], device)
    check_feature(s, t, kind=kind, normalize=normalize, mask=m, reduction="mean")
    check_feature(s, t, kind=kind, normalize=normalize, reduction="none",
                  grad_output=torch.rand(shape[:-1], device=device) * 4)


def test_float64(device):
    for kind in KINDS:
        for normalize in (False, True):
            shape = (3, 2, 29)
            s = features(shape, torch.float64, device)
            t = features(shape, torch.float64, device)
            check_feature(s, t, kind=kind, normalize=normalize, mask=random_mask(shape[:-1], device))


VIEWS = {
    # name: (student base shape, teacher base shape, make(base_s, base_t) -> (s, t))
    "slices": ((4, 6, 21), (4, 6, 21), lambda a, b: (a[:, 1:, 2:], b[:, :-1, :-2])),
    "transposed": ((4, 19, 6), (4, 19, 6), lambda a, b: (a.transpose(1, 2), b.transpose(1, 2))),
    "expanded_teacher": ((7, 19), (1, 19), lambda a, b: (a, b.expand(7, 19))),
    "expanded_3d": ((3, 5, 11), (5, 11), lambda a, b: (a, b.expand(3, 5, 11))),
    "permuted_4d": ((2, 3, 4, 11), (4, 2, 3, 11), lambda a, b: (a.permute(2, 0, 1, 3), b)),
    "strided_rows": ((8, 3, 2, 13), (4, 3, 2, 13), lambda a, b: (a[::2], b)),
    "column": ((9, 1), (1, 9), lambda a, b: (a, b.t())),  # D = 1
}


@pytest.mark.parametrize("view", list(VIEWS))
@pytest.mark.parametrize("normalize", (False, True), ids=("raw", "normalize"))
@pytest.mark.parametrize("kind", KINDS)
def test_non_contiguous_views(device, kind, normalize, view):
    s_shape, t_shape, make = VIEWS[view]
    if view == "column" and (normalize or kind == "cosine"):
        pytest.skip("D = 1: the exact gradient is 0 (test_awkward_shapes checks its noise)")
    base_s, base_t = features(s_shape, device=device), features(t_shape, device=device)
    check_views(base_s, base_t, make, kind=kind, normalize=normalize, reduction="sum")
    rows_shape = make(base_s, base_t)[0].shape[:-1]
    check_views(base_s, base_t, make, kind=kind, normalize=normalize, reduction="mean",
                mask=random_mask(rows_shape, device))


def test_non_contiguous_low_precision(device):
    base_s = features((4, 6, 21), torch.bfloat16, device)
    base_t = features((21, 6, 4), torch.float16, device)
    for kind in KINDS:
        check_views(base_s, base_t, lambda a, b: (a[:, 1:], b.permute(2, 1, 0)[:, 1:]), kind=kind,
                    normalize=True)


@pytest.mark.parametrize("normalize", (False, True), ids=("raw", "normalize"))
@pytest.mark.parametrize("kind", KINDS)
def test_zero_vectors(device, kind, normalize):
    """Rows where the student, the teacher or both are zero: torch's values (cosine: loss 1
    and the large finite gradient), each row at its own scale."""
    s, t = features((5, 9), device=device), features((5, 9), device=device)
    s[0] = 0
    t[1] = 0
    s[2] = 0
    t[2] = 0
    loss, gs, gt = check_feature(s, t, kind=kind, normalize=normalize, reduction="none", per_row=True)
    assert torch.isfinite(gs).all() and torch.isfinite(gt).all()
    if kind == "cosine":
        assert torch.all(loss[:3] == 1.0), loss
        assert torch.all(gs[2] == 0) and torch.all(gt[2] == 0)
    # Masked, the rows cost nothing and get nothing.
    mask = torch.tensor([False, False, False, True, True], device=device)
    loss, gs, gt = check_feature(s, t, kind=kind, normalize=normalize, mask=mask)
    assert torch.all(gs[:3] == 0) and torch.all(gt[:3] == 0)


@pytest.mark.parametrize("normalize", (False, True), ids=("raw", "normalize"))
def test_cosine_tiny_vectors_exact_derivative(device, normalize):
    """Below ||x|| = 1e-8 (cosine) or 1e-12 (normalize) the clamps are active: the gradient
    is the exact derivative of the formula (the clamped norm is constant), which
    kdfast.reference writes with clamp_min."""
    s = features((4, 7), torch.float64, device)
    t = features((4, 7), torch.float64, device)
    s[0] *= 1e-10
    t[1] *= 1e-14
    s[2] *= 1e-9
    t[2] *= 1e-13
    for kind in KINDS:
        s_k = s.clone().requires_grad_(True)
        t_k = t.clone().requires_grad_(True)
        out = kdfast.feature_loss(s_k, t_k, kind=kind, normalize=normalize, reduction="none")
        out.sum().backward()
        s_r = s.clone().requires_grad_(True)
        t_r = t.clone().requires_grad_(True)
        ref = kdfast.reference.feature_loss_rows(s_r, t_r, kind, normalize)
        ref.sum().backward()
        assert_loss_close(out, ref.detach(), torch.float64, f"{kind} loss")
        assert_grad_close(s_k.grad, s_r.grad, f"{kind} grad_student", per_row=True)
        assert_grad_close(t_k.grad, t_r.grad, f"{kind} grad_teacher", per_row=True)


def test_normalize_is_scale_invariant(device):
    s, t = features((6, 33), device=device), features((6, 33), device=device)
    scale = torch.tensor([1e-6, 1.0, 1e3, 7.0, 1e-3, 1e4], device=device)[:, None]
    for kind in KINDS:
        with torch.no_grad():
            a = kdfast.feature_loss(s, t, kind=kind, normalize=True, reduction="none")
            b = kdfast.feature_loss(s * scale, t / scale, kind=kind, normalize=True, reduction="none")
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("normalize", (False, True), ids=("raw", "normalize"))
@pytest.mark.parametrize("kind", KINDS)
def test_nan_rows(device, kind, normalize):
    """NaN in a row gives a NaN loss for that row only; NaN / inf in unselected rows do not
    reach the result or the gradients."""
    s, t = features((4, 10), device=device), features((4, 10), device=device)
    s[1, 3] = float("nan")
    t[2, 4] = float("inf")
    t[3, 0] = float("nan")
    with torch.no_grad():
        rows = kdfast.feature_loss(s, t, kind=kind, normalize=normalize, reduction="none")
    assert torch.isfinite(rows[0]) and torch.isnan(rows[1]) and torch.isnan(rows[3]), rows
    mask = torch.tensor([True, False, False, False], device=device)
    loss, gs, _ = check_feature(s, t, kind=kind, normalize=normalize, mask=mask, reduction="sum")
    assert torch.isfinite(loss) and torch.all(gs[1:] == 0)


def test_scaled_and_shifted_inputs(device):
    """Large magnitudes: smooth_l1 in its linear branch, normalise of 1e4-scale rows."""
    s, t = features((5, 40), device=device, scale=1e4), features((5, 40), device=device, scale=1e4)
    for kind in KINDS:
        for normalize in (False, True):
            check_feature(s, t, kind=kind, normalize=normalize)


def test_module(device):
    s, t = features((3, 4, 16), device=device), features((3, 4, 16), device=device)
    m = random_mask((3, 4), device)
    crit = kdfast.FeatureLoss(kind="smooth_l1", normalize=True, reduction="none")
    assert "smooth_l1" in repr(crit) and "normalize=True" in repr(crit)
    out = crit(s, t, mask=m)
    expected = kdfast.feature_loss(s, t, kind="smooth_l1", normalize=True, mask=m, reduction="none")
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    crit2 = kdfast.FeatureLoss()
    s2 = s.clone().requires_grad_(True)
    crit2(s2, t).backward()
    _, ref_gs, _ = ref_loss_and_grads(s, t, teacher_grad=False)
    assert_grad_close(s2.grad, ref_gs)


def test_reference_module_matches_independent_reference(device):
    """kdfast.reference.feature_loss (the fallback) against torch's functions, all options."""
    shape = (3, 4, 13)
    s, t = features(shape, device=device), features(shape, device=device)
    m = random_mask(shape[:-1], device)
    for kind in KINDS:
        for normalize in (False, True):
            for reduction in REDUCTIONS:
                for mask in (None, m):
                    check_feature(s, t, fn=kdfast.reference.feature_loss, kind=kind,
                                  normalize=normalize, mask=mask, reduction=reduction)
    empty = torch.zeros(shape[:-1], dtype=torch.bool, device=device)
    out = kdfast.reference.feature_loss(s, t, kind="cosine", mask=empty)
    assert float(out) == 0.0


def test_reference_float32_inputs_keep_float32(device):
    s = features((3, 8), torch.bfloat16, device)
    t = features((3, 8), torch.float16, device)
    out = kdfast.feature_loss(s, t, kind="cosine", normalize=True, reduction="none")
    ref = ref_feature_loss(s, t, kind="cosine", normalize=True, reduction="none")
    assert out.dtype == torch.float32
    assert_loss_close(out, ref, torch.float32)


FALLBACK_CHILD = """
import sys, warnings
sys.path[:0] = [{root!r}, {tests!r}]
import torch
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import kdfast
    from feature_helpers import KINDS, check_feature, features, random_mask
    assert not kdfast.has_extension()
    for kind in KINDS:
        s, t = features((3, 4, 19), torch.bfloat16), features((3, 4, 19))
        check_feature(s, t, kind=kind, normalize=kind != "mse", mask=random_mask((3, 4)))
assert any("plain-PyTorch reference" in str(w.message) for w in caught), [str(w.message) for w in caught]
print("ok")
"""


def test_fallback_without_extension():
    """KDFAST_DISABLE_EXTENSION=1: feature_loss is the plain-PyTorch reference, with a warning."""
    import os
    import subprocess
    import sys

    tests = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, KDFAST_DISABLE_EXTENSION="1")
    code = FALLBACK_CHILD.format(root=os.path.dirname(tests), tests=tests)
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.split()[-1:] == ["ok"], (
        proc.stdout[-2000:] + proc.stderr[-3000:])
