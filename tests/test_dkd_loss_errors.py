"""Bad arguments to kdfast.dkd_loss / kdfast.DKDLoss / the ops raise at once, naming the
argument; labels out of range are an error on CPU (never an out-of-bounds access)."""

from __future__ import annotations

import math

import pytest
import torch
from dkd_helpers import labels_for, logits

import kdfast

pytestmark = pytest.mark.usefixtures("needs_extension")


def _inputs(shape=(4, 10), device="cpu"):
    return (logits(shape, device=device), logits(shape, device=device),
            labels_for(shape[:-1], shape[-1], device=device))


@pytest.mark.parametrize("name, value, error, match", [
    ("alpha", -0.1, ValueError, "alpha must be finite and >= 0"),
    ("alpha", math.nan, ValueError, "alpha must be finite"),
    ("alpha", math.inf, ValueError, "alpha must be finite"),
    ("alpha", True, TypeError, "alpha must be a float"),
    ("alpha", "1", TypeError, "alpha must be a float"),
    ("beta", -1.0, ValueError, "beta must be finite and >= 0"),
    ("beta", math.nan, ValueError, "beta must be finite"),
    ("beta", None, TypeError, "beta must be a float"),
    ("temperature", 0.0, ValueError, "temperature must be finite and > 0"),
    ("temperature", -2.0, ValueError, "temperature must be finite and > 0"),
    ("temperature", math.inf, ValueError, "temperature must be finite and > 0"),
    ("temperature", math.nan, ValueError, "temperature must be finite and > 0"),
    ("temperature", torch.tensor(2.0), TypeError, "temperature must be a float"),
    ("ignore_index", -100.0, TypeError, "ignore_index must be an int"),
    ("ignore_index", False, TypeError, "ignore_index must be an int"),
    ("reduction", "mean", ValueError, "reduction must be one of"),
    ("reduction", None, ValueError, "reduction must be one of"),
])
def test_bad_options(name, value, error, match):
    s, t, y = _inputs()
    with pytest.raises(error, match=f"dkd_loss: {match}"):
        kdfast.dkd_loss(s, t, y, **{name: value})
    with pytest.raises(error, match=f"dkd_loss: {match}"):
        kdfast.DKDLoss(**{name: value})
    with pytest.raises(error, match=f"dkd_loss: {match}"):
        kdfast.reference.dkd_loss(s, t, y, **{name: value})


def test_bad_tensors():
    s, t, y = _inputs()
    cases = [
        ((s, t[:, :-1], y), ValueError, "student_logits and teacher_logits must have the same shape"),
        ((s.numpy(), t, y), TypeError, "student_logits must be a torch.Tensor"),
        ((s, t.long(), y), TypeError, "teacher_logits must be float32"),
        ((s.int(), t, y), TypeError, "student_logits must be float32"),
        ((s.double(), t, y), TypeError, "float64 student_logits and teacher_logits must both be float64"),
        ((torch.tensor(1.0), torch.tensor(1.0), y), ValueError, "student_logits must have shape"),
        ((s[:, :1], t[:, :1], y), ValueError,
         "student_logits must have a vocabulary \\(last\\) dimension >= 2"),
        ((s, t, None), TypeError, "labels must be a torch.Tensor"),
        ((s, t, [1, 2, 3, 4]), TypeError, "labels must be a torch.Tensor"),
        ((s, t, y.float()), TypeError, "labels must be an integer tensor"),
        ((s, t, y.bool()), TypeError, "labels must be an integer tensor"),
        ((s, t, y[:3]), ValueError, "labels must have the leading shape"),
        ((s, t, y[:, None]), ValueError, "labels must have the leading shape"),
    ]
    for args, error, match in cases:
        with pytest.raises(error, match=f"dkd_loss: {match}"):
            kdfast.dkd_loss(*args)
        with pytest.raises(error, match=f"dkd_loss: {match}"):
            kdfast.reference.dkd_loss(*args)


@pytest.mark.parametrize("bad", [10, 11, -1, -101])
def test_labels_out_of_range_cpu(bad):
    s, t, y = _inputs()
    y[2] = bad
    msg = "dkd_loss: labels must be in \\[0, 10\\) or equal ignore_index \\(-100\\), got " + str(bad)
    s.requires_grad_(True)
    with pytest.raises(ValueError, match=msg):
        kdfast.dkd_loss(s, t, y)
    with pytest.raises(ValueError, match=msg):
        kdfast.reference.dkd_loss(s, t, y)
    with pytest.raises(ValueError, match=msg):  # the op itself, and its backward
        torch.ops.kdfast.dkd_loss_fused(s, t, y, 1.0, 8.0, 4.0, -100, 0, False, False)
    stats = torch.zeros(4, 8)
    with pytest.raises(ValueError, match=msg):
        torch.ops.kdfast.dkd_loss_backward(torch.ones(4), s.detach(), t, y, stats, 1.0, 8.0, 4.0,
                                           -100, True, False)
    # The same value as ignore_index is fine.
    y = torch.where(y == -100, bad, y)
    assert torch.isfinite(kdfast.dkd_loss(s, t, y, ignore_index=bad))


def test_op_checks_its_arguments():
    """The C++ checks, for callers of torch.ops.kdfast.* directly."""
    s, t, y = _inputs()
    op = torch.ops.kdfast.dkd_loss_fused
    cases = [
        (lambda: op(s, t, y, 1.0, 8.0, 4.0, -100, 3, False, False), "reduction must be 0"),
        (lambda: op(s, t, y, 1.0, 8.0, 0.0, -100, 0, False, False), "temperature must be finite and > 0"),
        (lambda: op(s, t, y, -1.0, 8.0, 4.0, -100, 0, False, False), "alpha must be finite and >= 0"),
        (lambda: op(s, t, y, 1.0, math.nan, 4.0, -100, 0, False, False), "beta must be finite and >= 0"),
        (lambda: op(s, t, y.int(), 1.0, 8.0, 4.0, -100, 0, False, False), "labels must be int64"),
        (lambda: op(s, t, y[:2], 1.0, 8.0, 4.0, -100, 0, False, False), "labels must have the leading shape"),
        (lambda: op(s[:, :1], t[:, :1], y, 1.0, 8.0, 4.0, -100, 0, False, False),
         "the vocabulary \\(last\\) dimension of student_logits must be >= 2"),
        (lambda: op(s, t[:3], y, 1.0, 8.0, 4.0, -100, 0, False, False),
         "student_logits and teacher_logits must have the same shape"),
        (lambda: op(s.double(), t, y, 1.0, 8.0, 4.0, -100, 0, False, False),
         "float64 student_logits and teacher_logits must both be float64"),
        (lambda: op(s.long(), t, y, 1.0, 8.0, 4.0, -100, 0, False, False), "student_logits must be float32"),
    ]
    for fn, match in cases:
        with pytest.raises(RuntimeError, match=f"dkd_loss: {match}"):
            fn()
    _, stats, _, _ = op(s, t, y, 1.0, 8.0, 4.0, -100, 0, False, False)
    back = torch.ops.kdfast.dkd_loss_backward
    with pytest.raises(RuntimeError, match="dkd_loss_backward: stats must be"):
        back(torch.ones(4), s, t, y, stats[:, :7], 1.0, 8.0, 4.0, -100, True, False)
    with pytest.raises(RuntimeError, match="dkd_loss_backward: grad_loss must have 4 elements"):
        back(torch.ones(3), s, t, y, stats, 1.0, 8.0, 4.0, -100, True, False)
    with pytest.raises(RuntimeError, match="dkd_loss_backward: grad_loss must be"):
        back(torch.ones(4, dtype=torch.float64), s, t, y, stats, 1.0, 8.0, 4.0, -100, True, False)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU available")
def test_device_mismatch():
    s, t, y = _inputs()
    with pytest.raises(ValueError,
                       match="dkd_loss: student_logits and teacher_logits must be on the same device"):
        kdfast.dkd_loss(s, t.cuda(), y)
    with pytest.raises(ValueError, match="dkd_loss: labels must be on"):
        kdfast.dkd_loss(s.cuda(), t.cuda(), y)
