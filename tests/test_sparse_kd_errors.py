"""Bad arguments to kdfast.sparse_kd_loss / kdfast.SparseKDLoss / the ops raise at once,
naming the argument; labels and teacher indices out of range are an error on CPU (never an
out-of-bounds access)."""

from __future__ import annotations

import math

import pytest
import torch
from sparse_helpers import labels_for, logits, random_support

import kdfast

pytestmark = pytest.mark.usefixtures("needs_extension")


def _inputs(shape=(4, 10), k=3):
    s = logits(shape)
    idx, val = random_support(shape[:-1], shape[-1], k)
    return s, idx, val, labels_for(shape[:-1], shape[-1])


@pytest.mark.parametrize("name, value, error, match", [
    ("values", "logits", ValueError, "values must be one of"),
    ("tail", "drop", ValueError, "tail must be one of"),
    ("alpha", -0.1, ValueError, "alpha must be in \\[0, 1\\]"),
    ("alpha", 1.5, ValueError, "alpha must be in \\[0, 1\\]"),
    ("alpha", math.nan, ValueError, "alpha must be in \\[0, 1\\]"),
    ("alpha", True, TypeError, "alpha must be a float"),
    ("temperature", 0.0, ValueError, "temperature must be finite and > 0"),
    ("temperature", math.inf, ValueError, "temperature must be finite and > 0"),
    ("temperature", "2", TypeError, "temperature must be a float"),
    ("ignore_index", -100.0, TypeError, "ignore_index must be an int"),
    ("reduction", "mean", ValueError, "reduction must be one of"),
])
def test_bad_options(name, value, error, match):
    s, idx, val, y = _inputs()
    with pytest.raises(error, match=f"sparse_kd_loss: {match}"):
        kdfast.sparse_kd_loss(s, idx, val, y, **{name: value})
    with pytest.raises(error, match=f"sparse_kd_loss: {match}"):
        kdfast.SparseKDLoss(**{name: value})
    with pytest.raises(error, match=f"sparse_kd_loss: {match}"):
        kdfast.reference.sparse_kd_loss(s, idx, val, y, **{name: value})


def test_bad_tensors():
    s, idx, val, _ = _inputs()
    cases = [
        ((s.numpy(), idx, val), TypeError, "student_logits must be a torch.Tensor"),
        ((s.int(), idx, val), TypeError, "student_logits must be float32"),
        ((torch.tensor(1.0), idx, val), ValueError, "student_logits must have shape"),
        ((s, idx.float(), val), TypeError, "teacher_indices must be int32 or int64"),
        ((s, idx.short(), val), TypeError, "teacher_indices must be int32 or int64"),
        ((s, idx.tolist(), val), TypeError, "teacher_indices must be a torch.Tensor"),
        ((s, idx, val.long()), TypeError, "teacher_values must be float32"),
        ((s, idx[:3], val[:3]), ValueError, "teacher_indices must have shape \\[..., K\\]"),
        ((s, idx[None], val[None]), ValueError, "teacher_indices must have shape \\[..., K\\]"),
        ((s, idx, val[:, :2]), ValueError, "teacher_indices and teacher_values must have the same shape"),
        ((s, idx[:, :0], val[:, :0]), ValueError, "teacher_values must have a vocabulary"),
        ((s.double(), idx, val), TypeError, "float64 student_logits and teacher_values must both be float64"),
        ((s, idx, val.double()), TypeError, "float64 student_logits and teacher_values must both be float64"),
    ]
    for args, error, match in cases:
        with pytest.raises(error, match=f"sparse_kd_loss: {match}"):
            kdfast.sparse_kd_loss(*args)
        with pytest.raises(error, match=f"sparse_kd_loss: {match}"):
            kdfast.reference.sparse_kd_loss(*args)


def test_bad_labels():
    s, idx, val, y = _inputs()
    cases = [
        ((y.float(),), {}, TypeError, "labels must be an integer tensor"),
        ((y[:3],), {}, ValueError, "labels must have the leading shape"),
        ((None,), {"alpha": 0.5}, ValueError, "alpha > 0 needs labels"),
    ]
    for args, kwargs, error, match in cases:
        with pytest.raises(error, match=f"sparse_kd_loss: {match}"):
            kdfast.sparse_kd_loss(s, idx, val, *args, **kwargs)


@pytest.mark.parametrize("bad", [10, 11, -2, -100000])
def test_teacher_index_out_of_range_cpu(bad):
    """The CPU kernel checks every index before reading (the Python path adds no sync)."""
    s, idx, val, _ = _inputs()
    idx[2, 1] = bad
    msg = f"sparse_kd_loss: teacher_indices must be in \\[0, 10\\) or -1 \\(padding\\), got {bad} at row 2"
    for tail in ("renormalize", "residual"):
        with pytest.raises(ValueError, match=msg):
            kdfast.sparse_kd_loss(s, idx, val, tail=tail)
        with pytest.raises(ValueError, match=msg):
            kdfast.sparse_kd_loss(s.requires_grad_(True), idx.int(), val, tail=tail)
        s.requires_grad_(False)
    with pytest.raises(ValueError, match="sparse_kd_loss: teacher_indices must be in \\[0, 10\\)"):
        kdfast.reference.sparse_kd_loss(s, idx, val)


@pytest.mark.parametrize("bad", [10, -1, -101])
def test_labels_out_of_range_cpu(bad):
    s, idx, val, y = _inputs()
    y[2] = bad
    msg = f"sparse_kd_loss: labels must be in \\[0, 10\\) or equal ignore_index \\(-100\\), got {bad}"
    with pytest.raises(ValueError, match=msg):
        kdfast.sparse_kd_loss(s, idx, val, y, alpha=0.5)
    with pytest.raises(ValueError, match=msg):
        kdfast.reference.sparse_kd_loss(s, idx, val, y, alpha=0.5)


def test_op_checks_its_own_arguments():
    """The op can be called directly: the C++ checks name the arguments too."""
    s, idx, val, y = _inputs()
    op = torch.ops.kdfast.sparse_kd_loss_fused

    def call(**changes):
        args = dict(student=s, teacher_indices=idx, teacher_values=val, labels=y, temperature=1.0, alpha=0.0,
                    logprobs=True, tail=0, ignore_index=-100, reduction=0, student_requires_grad=False)
        args.update(changes)
        return op(*args.values())

    cases = [
        (dict(temperature=0.0), "temperature must be finite and > 0"),
        (dict(temperature=math.nan), "temperature must be finite and > 0"),
        (dict(alpha=2.0), "alpha must be in \\[0, 1\\]"),
        (dict(alpha=0.5, labels=None), "alpha > 0 needs labels"),
        (dict(tail=2), "tail must be 0 \\(renormalize\\) or 1 \\(residual\\)"),
        (dict(reduction=3), "reduction must be 0 \\(batchmean\\), 1 \\(sum\\) or 2 \\(none\\)"),
        (dict(teacher_indices=idx.float()), "teacher_indices must be int32 or int64"),
        (dict(teacher_values=val.long()), "teacher_values must be float32"),
        (dict(teacher_indices=idx[:2], teacher_values=val[:2]), "teacher_indices must have shape"),
        (dict(teacher_values=val[:, :2]), "teacher_indices and teacher_values must have the same shape"),
        (dict(student=s.double()), "float64 student_logits and teacher_values must both be float64"),
        (dict(labels=y.int()), "labels must be int64"),
        (dict(labels=y[:2]), "labels must have the leading shape"),
        (dict(student=s.long()), "student_logits must be float32"),
    ]
    for changes, match in cases:
        with pytest.raises(RuntimeError, match=f"sparse_kd_loss: {match}"):
            call(**changes)
    with pytest.raises(RuntimeError, match="sparse_kd_loss_backward: stats must be"):
        torch.ops.kdfast.sparse_kd_loss_backward(torch.ones(4), s, idx, val, y, torch.zeros(4, 6), 1.0, 0.0,
                                                 True, 0, -100)
    with pytest.raises(RuntimeError, match="sparse_kd_loss_backward: grad_loss must have 4 elements"):
        torch.ops.kdfast.sparse_kd_loss_backward(torch.ones(3), s, idx, val, y, torch.zeros(4, 7), 1.0, 0.0,
                                                 True, 0, -100)
