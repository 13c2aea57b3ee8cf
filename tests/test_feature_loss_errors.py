"""Every bad argument of feature_loss raises at once with the argument's name in the
message (never a crash), through feature_loss, FeatureLoss, the reference and the ops
themselves."""

from __future__ import annotations

import pytest
import torch

import kdfast

ERRORS = (ValueError, TypeError, RuntimeError)
FUNCTIONS = [kdfast.feature_loss, kdfast.reference.feature_loss]


def _inputs(device, shape=(4, 10), dtype=torch.float32):
    return torch.randn(shape, device=device, dtype=dtype), torch.randn(shape, device=device, dtype=dtype)


@pytest.mark.parametrize("fn", FUNCTIONS, ids=("kernel", "reference"))
@pytest.mark.parametrize("kind", ("MSE", "kl", "", None, 3, "cos"))
def test_bad_kind(device, fn, kind):
    s, t = _inputs(device)
    with pytest.raises(ERRORS, match="kind"):
        fn(s, t, kind=kind)
    with pytest.raises(ERRORS, match="kind"):
        kdfast.FeatureLoss(kind=kind)


@pytest.mark.parametrize("fn", FUNCTIONS, ids=("kernel", "reference"))
@pytest.mark.parametrize("reduction", ("batchmean", "avg", None, 0))
def test_bad_reduction(device, fn, reduction):
    s, t = _inputs(device)
    with pytest.raises(ERRORS, match="reduction"):
        fn(s, t, reduction=reduction)
    with pytest.raises(ERRORS, match="reduction"):
        kdfast.FeatureLoss(reduction=reduction)


@pytest.mark.parametrize("normalize", (1, 0, "yes", None))
def test_normalize_must_be_bool(device, normalize):
    s, t = _inputs(device)
    with pytest.raises(ERRORS, match="normalize"):
        kdfast.feature_loss(s, t, normalize=normalize)
    with pytest.raises(ERRORS, match="normalize"):
        kdfast.FeatureLoss(normalize=normalize)


@pytest.mark.parametrize("fn", FUNCTIONS, ids=("kernel", "reference"))
def test_bad_tensors(device, fn):
    s, t = _inputs(device)
    with pytest.raises(ERRORS, match="same shape"):
        fn(s, t[:, :9])
    with pytest.raises(ERRORS, match="same shape"):
        fn(s, t[:3])
    with pytest.raises(ERRORS, match="student"):
        fn(s.long(), t)
    with pytest.raises(ERRORS, match="teacher"):
        fn(s, t.int())
    with pytest.raises(ERRORS, match="student"):
        fn(s.numpy() if device == "cpu" else [1.0], t)
    with pytest.raises(ERRORS, match="teacher"):
        fn(s, None)
    with pytest.raises(ERRORS, match="float64"):
        fn(s.double(), t)
    with pytest.raises(ERRORS, match="student"):
        fn(torch.tensor(1.0, device=device), torch.tensor(1.0, device=device))
    with pytest.raises(ERRORS, match="feature"):
        fn(s[:, :0], t[:, :0])


@pytest.mark.parametrize("fn", FUNCTIONS, ids=("kernel", "reference"))
def test_bad_mask(device, fn):
    s, t = _inputs(device, (3, 4, 10))
    with pytest.raises(ERRORS, match="mask"):
        fn(s, t, mask=torch.ones(3, 4, device=device))  # float
    with pytest.raises(ERRORS, match="mask"):
        fn(s, t, mask=torch.ones(3, 4, device=device, dtype=torch.int64))
    with pytest.raises(ERRORS, match="mask"):
        fn(s, t, mask=torch.ones(12, device=device, dtype=torch.bool))
    with pytest.raises(ERRORS, match="mask"):
        fn(s, t, mask=torch.ones(3, 4, 10, device=device, dtype=torch.bool))
    with pytest.raises(ERRORS, match="mask"):
        fn(s, t, mask=[[True] * 4] * 3)
    with pytest.raises(ERRORS, match="mask"):
        kdfast.FeatureLoss()(s, t, torch.ones(4, 3, device=device, dtype=torch.bool))


def test_device_mismatch(device):
    if device != "cuda":
        pytest.skip("needs a second device")
    s, t = _inputs(device)
    with pytest.raises(ERRORS, match="device"):
        kdfast.feature_loss(s, t.cpu())
    with pytest.raises(ERRORS, match="mask"):
        kdfast.feature_loss(s, t, mask=torch.ones(4, dtype=torch.bool))


# ----------------------------------------------------------------------------- the ops directly


def test_op_checks_its_arguments(device, needs_extension):
    s, t = _inputs(device, (3, 4, 10))
    op = torch.ops.kdfast.feature_loss_fused
    with pytest.raises(ERRORS, match="kind"):
        op(s, t, None, 4, False, 0, True, False)
    with pytest.raises(ERRORS, match="kind"):
        op(s, t, None, -1, False, 0, True, False)
    with pytest.raises(ERRORS, match="reduction"):
        op(s, t, None, 0, False, 3, True, False)
    with pytest.raises(ERRORS, match="mask"):
        op(s, t, torch.ones(3, 4, device=device), 0, False, 0, True, False)
    with pytest.raises(ERRORS, match="mask"):
        op(s, t, torch.ones(4, 3, device=device, dtype=torch.bool), 0, False, 0, True, False)
    with pytest.raises(ERRORS, match="same shape"):
        op(s, t[..., 1:], None, 0, False, 0, True, False)
    with pytest.raises(ERRORS, match="student"):
        op(s.int(), t, None, 0, False, 0, True, False)
    with pytest.raises(ERRORS, match="float64"):
        op(s, t.double(), None, 0, False, 0, True, False)
    with pytest.raises(ERRORS, match="feature"):
        op(s[..., :0], t[..., :0], None, 0, False, 0, True, False)


def test_backward_op_checks_its_arguments(device, needs_extension):
    s, t = _inputs(device, (3, 4, 10))
    _, stats, _, _ = torch.ops.kdfast.feature_loss_fused(s, t, None, 3, True, 2, False, False)
    op = torch.ops.kdfast.feature_loss_backward
    ones = torch.ones(3, 4, device=device)
    with pytest.raises(ERRORS, match="grad_loss"):
        op(torch.ones(11, device=device), s, t, None, stats, 3, True, True, False)
    with pytest.raises(ERRORS, match="grad_loss"):
        op(ones.double(), s, t, None, stats, 3, True, True, False)
    with pytest.raises(ERRORS, match="stats"):
        op(ones, s, t, None, stats[:, :2], 3, True, True, False)
    with pytest.raises(ERRORS, match="stats"):
        op(ones, s, t, None, stats[:5], 3, True, True, False)
    with pytest.raises(ERRORS, match="kind"):
        op(ones, s, t, None, stats, 9, True, True, False)
    with pytest.raises(ERRORS, match="mask"):
        op(ones, s, t, torch.ones(3, device=device, dtype=torch.bool), stats, 3, True, True, False)
