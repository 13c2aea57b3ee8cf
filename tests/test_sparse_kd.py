"""kdfast.sparse_kd_loss / kdfast.SparseKDLoss against the independent float64 reference
(tests/sparse_helpers.py) and kdfast.reference: every option, every dtype pair, index
dtypes, awkward shapes, views, degenerate rows, and the dense kd_loss at full support."""

from __future__ import annotations

import math

import pytest
import torch
from sparse_helpers import (
    DTYPE_PAIRS,
    REDUCTIONS,
    TAILS,
    VALUES,
    check_sparse,
    labels_for,
    logits,
    pair_id,
    random_support,
    ref_sparse,
    ref_sparse_and_grad,
    run_sparse,
    topk_teacher,
)

import kdfast

pytestmark = pytest.mark.usefixtures("needs_extension")


def _support(kind, rows_shape, vocab, k, device, values="logprobs", **kw):
    """(indices, values) of a top-k teacher or of a random support with padding."""
    if kind == "topk":
        idx, val, _ = topk_teacher(rows_shape, vocab, k, values=values, device=device, **kw)
        return idx, val
    return random_support(rows_shape, vocab, k, values=values, device=device, pad_every=3, **kw)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("tail", TAILS)
@pytest.mark.parametrize("values", VALUES)
@pytest.mark.parametrize("alpha, temperature", [(0.0, 1.0), (0.0, 2.0), (0.4, 1.0), (0.3, 4.0), (1.0, 0.5)])
def test_every_option_matches_reference(device, values, tail, alpha, temperature, reduction):
    shape = (3, 5, 301)
    s = logits(shape, device=device)
    kind = "topk" if (alpha * 10 + temperature) % 2 < 1 else "random"
    idx, val = _support(kind, shape[:-1], shape[-1], 17, device, values=values,
                        **({"temperature": temperature} if kind == "topk" else {}))
    y = labels_for(shape[:-1], shape[-1], device=device) if alpha > 0 or reduction == "sum" else None
    check_sparse(s, idx, val, y, values=values, tail=tail, alpha=alpha, temperature=temperature,
                 reduction=reduction)


@pytest.mark.parametrize("index_dtype", (torch.int64, torch.int32), ids=("int64", "int32"))
@pytest.mark.parametrize("dtypes", DTYPE_PAIRS, ids=pair_id)
@pytest.mark.parametrize("tail", TAILS)
def test_every_dtype_pair(device, dtypes, index_dtype, tail):
    s_dtype, v_dtype = dtypes
    shape = (6, 1031)
    s = logits(shape, dtype=s_dtype, device=device)
    idx, val, _ = topk_teacher(shape[:-1], shape[-1], 40, temperature=2.0, dtype=v_dtype,
                               index_dtype=index_dtype, device=device)
    y = labels_for(shape[:-1], shape[-1], device=device)
    check_sparse(s, idx, val, y, tail=tail, alpha=0.2, temperature=2.0)
    idx, val = random_support(shape[:-1], shape[-1], 25, values="probs", dtype=v_dtype,
                              index_dtype=index_dtype, device=device, pad_every=4)
    check_sparse(s, idx, val, None, values="probs", tail=tail, reduction="none")


@pytest.mark.parametrize("tail", TAILS)
@pytest.mark.parametrize("values", VALUES)
def test_float64_is_tight(device, tail, values):
    shape = (4, 97)
    s = logits(shape, dtype=torch.float64, device=device)
    idx, val = random_support(shape[:-1], shape[-1], 11, values=values, dtype=torch.float64,
                              device=device, pad_every=5, mass=0.7)
    y = labels_for(shape[:-1], shape[-1], device=device)
    check_sparse(s, idx, val, y, values=values, tail=tail, alpha=0.25, temperature=1.5,
                 reduction="none")


def test_matches_kdfast_reference(device):
    """The plain-PyTorch reference (the fallback) agrees with the independent one and
    with the kernels."""
    s = logits((5, 263), device=device)
    idx, val = random_support((5,), 263, 30, device=device, pad_every=4, mass=0.8)
    for row in idx:  # index 0 in every support, next to the padding entries (which point there too)
        if not bool((row == 0).any()):
            row[1] = 0
    y = labels_for((5,), 263, device=device)
    for tail in TAILS:
        opts = dict(tail=tail, alpha=0.3, temperature=2.0)
        ref = ref_sparse(s.cpu(), idx.cpu(), val.cpu(), y.cpu(), values_kind="logprobs", **opts)
        fallback = kdfast.reference.sparse_kd_loss(s.double(), idx, val.double(), y, **opts)
        kernel = kdfast.sparse_kd_loss(s, idx, val, y, **opts)
        torch.testing.assert_close(fallback.cpu(), ref, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(kernel.cpu().double(), ref, rtol=2e-5, atol=1e-5)


# ----------------------------------------------------------------------------- full support


@pytest.mark.parametrize("dtype", (torch.float32, torch.float64), ids=("fp32", "fp64"))
@pytest.mark.parametrize("temperature", (1.0, 3.0))
def test_full_support_equals_dense_kd_loss(device, dtype, temperature):
    """K = V with the teacher's full log_softmax: renormalize is exactly the dense forward
    KL of kd_loss; residual too (the tail mass is 0 up to rounding)."""
    shape = (2, 3, 257)
    s = logits(shape, dtype=dtype, device=device)
    t = logits(shape, dtype=dtype, device=device)
    y = labels_for(shape[:-1], shape[-1], device=device)
    log_p = torch.log_softmax(t.double() / temperature, dim=-1).to(dtype)
    order = torch.stack([torch.randperm(shape[-1]) for _ in range(6)]).reshape(*shape).to(device)
    idx, val = order, log_p.gather(-1, order)  # every index once, in a random order
    for alpha in (0.0, 0.5):
        x = s.clone().requires_grad_(True)
        dense = kdfast.kd_loss(x, t, y, temperature=temperature, alpha=alpha)
        dense.backward()
        dense, dense_grad = dense.detach(), x.grad
        tol = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=2e-5, atol=2e-5)
        for tail in TAILS:
            loss, grad = check_sparse(s, idx, val, y, tail=tail, temperature=temperature, alpha=alpha)
            torch.testing.assert_close(loss, dense, **tol)
            torch.testing.assert_close(grad, dense_grad, rtol=tol["rtol"] * 10, atol=tol["atol"])


def test_full_support_from_topk(device):
    """topk with k = V (sorted by the teacher, not by index) equals the dense loss too."""
    shape = (4, 100)
    s = logits(shape, device=device)
    idx, val, t = topk_teacher(shape[:-1], shape[-1], shape[-1], temperature=2.0, device=device)
    dense = kdfast.kd_loss(s, t.float(), temperature=2.0)
    for tail in TAILS:
        loss = kdfast.sparse_kd_loss(s, idx, val, temperature=2.0, tail=tail)
        torch.testing.assert_close(loss, dense, rtol=2e-5, atol=2e-5)


# ----------------------------------------------------------------------------- shapes


@pytest.mark.parametrize("shape, k", [
    ((4, 1), 1),          # V = 1
    ((3, 2), 2),          # K = V, tiny
    ((5, 7), 1),          # K = 1
    ((2, 33), 33),        # K = V, not a multiple of any vector width
    ((3, 513), 64),       # one element past a chunk of the AVX-512 kernels
    ((2, 1025), 5),
    ((2, 4099), 128),
    ((1, 50021), 64),     # large V, a single row
    ((2, 0, 9), 3),       # no rows
    ((7,), 3),            # 1-D: a single row without leading dims
])
@pytest.mark.parametrize("tail", TAILS)
def test_awkward_shapes(device, shape, k, tail):
    s = logits(shape, device=device)
    idx, val = random_support(shape[:-1], shape[-1], k, device=device, mass=0.85)
    y = labels_for(shape[:-1], shape[-1], device=device, ignore_every=0) if shape[-1] > 1 else None
    for reduction in REDUCTIONS:
        check_sparse(s, idx, val, y, tail=tail, alpha=0.3 if y is not None else 0.0,
                     temperature=2.0, reduction=reduction)


def test_large_vocab_few_rows_bfloat16(device):
    s = logits((3, 128256), dtype=torch.bfloat16, device=device)
    idx, val, _ = topk_teacher((3,), 128256, 64, device=device)
    for tail in TAILS:
        check_sparse(s, idx, val, None, tail=tail, reduction="none")


# ----------------------------------------------------------------------------- views


def test_views_and_strides(device):
    base = logits((4, 6, 131), device=device)
    s = base[:, :-1, :]  # rows sliced off: a two-level layout, no copy
    idx_base, val_base = random_support((4, 5), 131, 24, device=device, pad_every=5)
    idx, val = idx_base[..., ::2], val_base[..., ::2]  # K stride 2
    y = labels_for((4, 5), 131, device=device)
    for tail in TAILS:
        check_sparse(s, idx, val, y, tail=tail, alpha=0.3, temperature=2.0)
    # transposed leading dimensions; a transposed [V, N] student (vocabulary stride != 1)
    st = logits((5, 4, 131), device=device).transpose(0, 1)
    idx_t = idx_base.transpose(0, 1).contiguous().transpose(0, 1)
    check_sparse(st, idx_t, val_base.transpose(0, 1).contiguous().transpose(0, 1), y, tail="residual")
    sv = logits((131, 6), device=device).t()
    idx2, val2 = random_support((6,), 131, 10, device=device)
    check_sparse(sv, idx2, val2, None, tail="renormalize", temperature=0.7)
    # a one-element storage offset (rows off the vector grid)
    flat = logits((1 + 3 * 77,), device=device)
    s_off = flat[1:].view(3, 77)
    idx3, val3 = random_support((3,), 77, 9, device=device)
    check_sparse(s_off, idx3, val3, None, tail="residual")


def test_gradient_reaches_only_the_student(device):
    s = logits((4, 50), device=device).requires_grad_(True)
    idx, val = random_support((4,), 50, 6, device=device)
    val.requires_grad_(True)
    loss = kdfast.sparse_kd_loss(s, idx, val, tail="residual")
    loss.backward()
    assert s.grad is not None and val.grad is None
    only_teacher = kdfast.sparse_kd_loss(s.detach(), idx, val)
    assert not only_teacher.requires_grad


# ----------------------------------------------------------------------------- labels


def test_ignore_index_rows(device):
    shape = (2, 6, 90)
    s = logits(shape, device=device)
    idx, val = random_support(shape[:-1], shape[-1], 8, device=device)
    y = labels_for(shape[:-1], shape[-1], device=device, ignore_every=2, ignore_index=7)
    for reduction in REDUCTIONS:
        _, grad = check_sparse(s, idx, val, y, alpha=0.5, ignore_index=7, reduction=reduction,
                               tail="residual")
    ignored = (y == 7)
    assert bool((grad[ignored] == 0).all())
    rows = kdfast.sparse_kd_loss(s, idx, val, y, alpha=0.5, ignore_index=7, reduction="none")
    assert bool((rows[ignored] == 0).all())
    every = torch.full(shape[:-1], 7, device=device)
    assert float(kdfast.sparse_kd_loss(s, idx, val, every, ignore_index=7)) == 0.0


def test_labels_with_alpha_zero_only_ignore_rows(device):
    s = logits((6, 40), device=device)
    idx, val = random_support((6,), 40, 5, device=device)
    y = labels_for((6,), 40, device=device)
    with_labels = kdfast.sparse_kd_loss(s, idx, val, y, reduction="none")
    without = kdfast.sparse_kd_loss(s, idx, val, reduction="none")
    counted = y != -100
    torch.testing.assert_close(with_labels[counted], without[counted], rtol=0, atol=0)


# ----------------------------------------------------------------------------- degenerate rows


@pytest.mark.parametrize("tail", TAILS)
def test_padding_zero_weights_and_masked_entries(device, tail):
    v = 60
    s = logits((5, v), device=device)
    s[:, 50:] = -math.inf  # masked vocabulary, off the support
    idx, val = random_support((5,), 40, 8, device=device, mass=0.6)
    idx[0] = -1  # a row of padding only
    val[1, :3] = -math.inf  # zero-probability entries (log 0)
    idx[2, ::2] = -1
    check_sparse(s, idx, val, None, tail=tail, reduction="none", temperature=1.5)
    probs = val.exp()
    probs[3, :4] = 0.0
    check_sparse(s, idx, probs, None, values="probs", tail=tail, reduction="none")
    rows = kdfast.sparse_kd_loss(s, idx, val, tail=tail, reduction="none")
    assert float(rows[0]) == 0.0  # empty support: D = 0 (residual: r_t = 1 = r_s)


def test_zero_teacher_mass_renormalize_is_zero(device):
    s = logits((3, 20), device=device).requires_grad_(True)
    idx = torch.tensor([[1, 2, 3], [4, -1, 5], [-1, -1, -1]], device=device)
    val = torch.full((3, 3), -math.inf, device=device)
    loss = kdfast.sparse_kd_loss(s, idx, val, reduction="sum")
    loss.backward()
    assert float(loss.detach()) == 0.0 and bool((s.grad == 0).all())


def test_residual_with_tiny_student_tail_is_accurate(device):
    """The student's mass off the support is summed directly (not 1 - its mass on the
    support): accurate to float32 rounding even when it is 1e-12 of the row."""
    v, k = 400, 10
    s = logits((4, v), scale=1.0, device=device)
    idx, val = random_support((4,), v, k, device=device, mass=0.95)
    rows = torch.arange(4, device=device)[:, None]
    s[rows, idx] += 28.0  # off-support mass ~ exp(-28) * (v - k) / k ~ 1e-11
    ref_loss, ref_grad = ref_sparse_and_grad(s, idx, val, None, tail="residual", reduction="none")
    loss, grad = run_sparse(s, idx, val, None, tail="residual", reduction="none")
    torch.testing.assert_close(loss.double().cpu(), ref_loss, rtol=1e-5, atol=0)
    off = torch.ones(4, v, dtype=torch.bool)
    off[rows.cpu(), idx.cpu()] = False
    # off the support the gradient is q_j (P + r_t - r_t / r_s), dominated by r_t / r_s
    torch.testing.assert_close(grad.double().cpu()[off], ref_grad[off], rtol=1e-4, atol=0)


def test_student_tail_underflow_is_floored(device):
    """r_s below the smallest normal is floored there (the loss stays finite), in the
    kernels and in kdfast.reference alike."""
    s = torch.zeros(2, 10, device=device)
    idx = torch.tensor([[0, 1, 2], [3, 4, -1]], device=device)
    val = torch.log(torch.tensor([[0.3, 0.3, 0.3], [0.5, 0.4, 0.0]], device=device))
    s[0, :3] = 200.0
    s[1, 3:5] = 200.0
    loss = kdfast.sparse_kd_loss(s, idx, val, tail="residual", reduction="none")
    fallback = kdfast.reference.sparse_kd_loss(s, idx, val, tail="residual", reduction="none")
    assert bool(torch.isfinite(loss).all())
    torch.testing.assert_close(loss, fallback, rtol=1e-5, atol=1e-5)


def test_nan_gives_nan_rows_only(device):
    s = logits((4, 30), device=device)
    idx, val = random_support((4,), 30, 5, device=device)
    s[1, 7] = math.nan
    s[2, 3] = math.inf
    val[3, 0] = math.nan
    for tail in TAILS:
        x = s.clone().requires_grad_(True)
        rows = kdfast.sparse_kd_loss(x, idx, val, tail=tail, reduction="none")
        rows.sum().backward()
        assert bool(torch.isfinite(rows[0])) and bool(rows[1:].isnan().all()), rows
        assert bool(torch.isfinite(x.grad[0]).all()) and bool(x.grad[1:].isnan().all())


def test_large_logits_keep_precision(device):
    s = logits((3, 200), device=device) + 1e4
    idx, val, _ = topk_teacher((3,), 200, 12, device=device)
    for tail in TAILS:
        check_sparse(s, idx, val, None, tail=tail, temperature=2.0)


# ----------------------------------------------------------------------------- module


def test_module_matches_function(device):
    s = logits((2, 3, 70), device=device)
    idx, val = random_support((2, 3), 70, 9, values="probs", device=device)
    y = labels_for((2, 3), 70, device=device)
    crit = kdfast.SparseKDLoss(values="probs", temperature=2.0, tail="residual", alpha=0.1,
                               reduction="sum")
    assert "tail='residual'" in repr(crit) and "values='probs'" in repr(crit)
    check_sparse(s, idx, val, y, fn=lambda a, b, c, d, **_: crit(a, b, c, d), values="probs",
                 temperature=2.0, tail="residual", alpha=0.1, reduction="sum")
    torch.testing.assert_close(crit(s, idx, val, y),
                               kdfast.sparse_kd_loss(s, idx, val, y, values="probs", temperature=2.0,
                                                     tail="residual", alpha=0.1, reduction="sum"),
                               rtol=0, atol=0)
