"""Every bad argument of DESIGN.md raises at once, with the argument's name in the
message (never a crash), through kd_loss, KDLoss and the ops themselves."""

from __future__ import annotations

import math

import pytest
import torch

import kdfast

ERRORS = (ValueError, TypeError, RuntimeError)


def _inputs(device, shape=(4, 10)):
    return torch.randn(shape, device=device), torch.randn(shape, device=device)


@pytest.mark.parametrize("temperature", (0.0, -1.0, -0.5, math.inf, -math.inf, math.nan))
def test_bad_temperature(device, temperature):
    s, t = _inputs(device)
    with pytest.raises(ERRORS, match="temperature"):
        kdfast.kd_loss(s, t, temperature=temperature)
    with pytest.raises(ERRORS, match="temperature"):
        kdfast.KDLoss(temperature=temperature)


@pytest.mark.parametrize("temperature", ("2", None, [2.0]))
def test_temperature_wrong_type(device, temperature):
    s, t = _inputs(device)
    with pytest.raises(ERRORS, match="temperature"):
        kdfast.kd_loss(s, t, temperature=temperature)


@pytest.mark.parametrize("alpha", (-0.1, 1.1, 2.0, math.nan, math.inf))
def test_bad_alpha(device, alpha):
    s, t = _inputs(device)
    y = torch.zeros(4, dtype=torch.int64, device=device)
    with pytest.raises(ERRORS, match="alpha"):
        kdfast.kd_loss(s, t, y, alpha=alpha)
    with pytest.raises(ERRORS, match="alpha"):
        kdfast.KDLoss(alpha=alpha)


def test_alpha_without_labels(device):
    s, t = _inputs(device)
    with pytest.raises(ERRORS, match="alpha"):
        kdfast.kd_loss(s, t, alpha=0.5)
    with pytest.raises(ERRORS, match="labels"):
        kdfast.kd_loss(s, t, None, alpha=0.5)
    with pytest.raises(ERRORS, match="labels"):
        kdfast.KDLoss(alpha=0.5)(s, t)


@pytest.mark.parametrize("beta", (0.0, 1.0, -0.2, 1.5, math.nan))
def test_bad_beta_for_jsd(device, beta):
    s, t = _inputs(device)
    with pytest.raises(ERRORS, match="beta"):
        kdfast.kd_loss(s, t, divergence="jsd", beta=beta)
    with pytest.raises(ERRORS, match="beta"):
        kdfast.KDLoss(divergence="jsd", beta=beta)


@pytest.mark.parametrize("divergence", ("kl", "forward-kl", "FORWARD_KL", "js", "", None, 0))
def test_unknown_divergence(device, divergence):
    s, t = _inputs(device)
    with pytest.raises(ERRORS, match="divergence"):
        kdfast.kd_loss(s, t, divergence=divergence)
    with pytest.raises(ERRORS, match="divergence"):
        kdfast.KDLoss(divergence=divergence)


@pytest.mark.parametrize("reduction", ("mean", "batch_mean", "avg", "", None))
def test_unknown_reduction(device, reduction):
    s, t = _inputs(device)
    with pytest.raises(ERRORS, match="reduction"):
        kdfast.kd_loss(s, t, reduction=reduction)
    with pytest.raises(ERRORS, match="reduction"):
        kdfast.KDLoss(reduction=reduction)


@pytest.mark.parametrize("shapes", [((4, 10), (4, 11)), ((4, 10), (5, 10)), ((4, 10), (10,)),
                                    ((2, 3, 10), (6, 10)), ((4, 10), (4, 10, 1))], ids=str)
def test_shape_mismatch(device, shapes):
    s = torch.randn(shapes[0], device=device)
    t = torch.randn(shapes[1], device=device)
    with pytest.raises(ERRORS, match=r"student_logits|teacher_logits"):
        kdfast.kd_loss(s, t)


def test_scalar_logits(device):
    s, t = torch.tensor(1.0, device=device), torch.tensor(2.0, device=device)
    with pytest.raises(ERRORS, match="student_logits"):
        kdfast.kd_loss(s, t)


def test_empty_vocabulary(device):
    s, t = torch.randn(4, 0, device=device), torch.randn(4, 0, device=device)
    with pytest.raises(ERRORS, match=r"student_logits|vocab"):
        kdfast.kd_loss(s, t)


@pytest.mark.parametrize("dtype", (torch.int64, torch.int32, torch.int8, torch.uint8, torch.bool,
                                   torch.complex64), ids=str)
@pytest.mark.parametrize("which", ("student_logits", "teacher_logits"))
def test_integer_logits(device, dtype, which):
    s, t = _inputs(device)
    bad = torch.ones(4, 10, dtype=dtype, device=device)
    args = (bad, t) if which == "student_logits" else (s, bad)
    with pytest.raises(ERRORS, match=which):
        kdfast.kd_loss(*args)


@pytest.mark.parametrize("which", ("student_logits", "teacher_logits"))
def test_logits_not_tensors(which):
    s = torch.randn(4, 10)
    args = (s.tolist(), s) if which == "student_logits" else (s, s.numpy())
    with pytest.raises(ERRORS, match=which):
        kdfast.kd_loss(*args)


# CPU only: on CUDA an out-of-range label trips a device-side assertion (no host sync),
# which poisons the CUDA context; test_kd_loss_cuda_graph.py checks it in a subprocess.
@pytest.mark.parametrize("bad_label", (10, 11, 1000, -1, -99, -101))
def test_labels_out_of_range(bad_label):
    s, t = _inputs("cpu")
    y = torch.tensor([0, 9, bad_label, -100])
    with pytest.raises(ERRORS, match="labels"):
        kdfast.kd_loss(s, t, y, alpha=0.5)
    with pytest.raises(ERRORS, match="labels"):
        kdfast.kd_loss(s, t, y)  # alpha = 0 still uses labels to pick rows


def test_labels_out_of_range_custom_ignore_index():
    s, t = _inputs("cpu")
    y = torch.tensor([0, -100, 3, 7])  # -100 is not ignored when ignore_index=0
    with pytest.raises(ERRORS, match="labels"):
        kdfast.kd_loss(s, t, y, alpha=0.5, ignore_index=0)


@pytest.mark.parametrize("shape", ((5,), (4, 1), (2, 2), ()), ids=str)
def test_labels_wrong_shape(device, shape):
    s, t = _inputs(device)
    y = torch.zeros(shape, dtype=torch.int64, device=device)
    with pytest.raises(ERRORS, match="labels"):
        kdfast.kd_loss(s, t, y, alpha=0.5)


@pytest.mark.parametrize("dtype", (torch.float32, torch.bool, torch.float64), ids=str)
def test_labels_wrong_dtype(device, dtype):
    s, t = _inputs(device)
    y = torch.zeros(4, dtype=dtype, device=device)
    with pytest.raises(ERRORS, match="labels"):
        kdfast.kd_loss(s, t, y, alpha=0.5)


def test_labels_not_a_tensor(device):
    s, t = _inputs(device)
    with pytest.raises(ERRORS, match="labels"):
        kdfast.kd_loss(s, t, [0, 1, 2, 3], alpha=0.5)


@pytest.mark.parametrize("ignore_index", (1.5, "x", None))
def test_bad_ignore_index_type(device, ignore_index):
    s, t = _inputs(device)
    with pytest.raises(ERRORS, match="ignore_index"):
        kdfast.kd_loss(s, t, ignore_index=ignore_index)


def test_error_leaves_no_state(device):
    """A failed call does not poison later calls."""
    s, t = _inputs(device)
    with pytest.raises(ERRORS):
        kdfast.kd_loss(s, t, temperature=-1.0)
    assert torch.isfinite(kdfast.kd_loss(s, t))


# ----------------------------------------------------------------------------- the ops


def _op_args(device, **over):
    s, t = _inputs(device)
    args = dict(student=s, teacher=t, labels=None, temperature=1.0, alpha=0.0, divergence=0,
                beta=0.5, ignore_index=-100, softcap=0.0, reduction=0, student_requires_grad=True,
                teacher_requires_grad=False)
    args.update(over)
    return args


@pytest.mark.parametrize("over, name", [
    (dict(temperature=0.0), "temperature"),
    (dict(temperature=math.nan), "temperature"),
    (dict(alpha=1.5, labels=torch.zeros(4, dtype=torch.int64)), "alpha"),
    (dict(alpha=0.5), "alpha"),
    (dict(divergence=3), "divergence"),
    (dict(divergence=-1), "divergence"),
    (dict(divergence=2, beta=1.0), "beta"),
    (dict(labels=torch.tensor([0, 1, 10, 2])), "labels"),
    (dict(labels=torch.tensor([0, 1, 2])), "labels"),
    (dict(labels=torch.zeros(4, dtype=torch.int32)), "labels"),
    (dict(teacher=torch.randn(4, 11)), "student_logits|teacher_logits"),
    (dict(student=torch.ones(4, 10, dtype=torch.int64)), "student_logits"),
    (dict(teacher=torch.ones(4, 10, dtype=torch.int32)), "teacher_logits"),
    (dict(softcap=-1.0), "softcap"),
    (dict(softcap=math.inf), "softcap"),
    (dict(reduction=3), "reduction"),
], ids=lambda x: x if isinstance(x, str) else None)
def test_forward_op_rejects_bad_arguments(needs_extension, over, name):
    args = _op_args("cpu", **over)
    with pytest.raises((RuntimeError, ValueError), match=name):
        torch.ops.kdfast.kd_loss_fused(*args.values())


def test_backward_op_rejects_bad_stats(needs_extension):
    s, t = _inputs("cpu")
    _loss, stats, _, _ = torch.ops.kdfast.kd_loss_fused(s, t, None, 1.0, 0.0, 0, 0.5, -100, 0.0,
                                                        2, False, False)
    with pytest.raises(RuntimeError, match="stats"):
        torch.ops.kdfast.kd_loss_backward(torch.ones(4), s, t, None, stats[:2], 1.0, 0.0, 0, 0.5,
                                          -100, 0.0, True, False)
    with pytest.raises(RuntimeError, match="grad_loss"):
        torch.ops.kdfast.kd_loss_backward(torch.ones(3), s, t, None, stats, 1.0, 0.0, 0, 0.5,
                                          -100, 0.0, True, False)


def test_scale_grad_op_rejects_bad_arguments(needs_extension):
    grad = torch.zeros(4, 10)
    with pytest.raises(RuntimeError, match="scale"):
        torch.ops.kdfast.kd_loss_scale_grad_(grad, torch.ones(3))
    with pytest.raises(RuntimeError, match="scale"):
        torch.ops.kdfast.kd_loss_scale_grad_(grad, torch.ones(4, dtype=torch.int64))
    with pytest.raises(RuntimeError, match="grad"):
        torch.ops.kdfast.kd_loss_scale_grad_(torch.zeros(10, 4).t(), torch.ones(4))
