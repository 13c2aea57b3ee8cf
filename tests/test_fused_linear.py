"""kdfast.fused_linear_kd_loss / fused_linear_sparse_kd_loss (and their modules and the
kdfast::fused_linear_* custom ops) against an independent float64 computation written here:
logits ``h @ W.T + b`` materialised in float64, then the distillation formula with
``log_softmax`` (forward KL, reverse KL, JSD(beta), the T^2 factor, alpha * cross-entropy at
T = 1, ignored rows, the three reductions, ``softcap``). Values and every student gradient
(hidden states, weight, bias) under a random incoming gradient, for many shapes, chunk sizes
(dividing N or not), views, bias layouts and dtypes; gradcheck, opcheck and
torch.compile(fullgraph=True); the sparse version against kdfast.sparse_kd_loss on
materialised logits; bad arguments. The reference checks also run on CUDA where a kernel and
a GPU exist. Three strict xfails mark known limits of kdfast/fused_linear.py (the fake
kernels' weight-gradient strides, gradients of frozen student tensors still computed); each
turns into a failure once fixed, so that its marker is removed."""

from __future__ import annotations

import doctest
import math
import time

import pytest
import torch
from sparse_helpers import ref_sparse

import kdfast
from kdfast import fused_linear

pytestmark = pytest.mark.usefixtures("needs_extension")

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")
REDUCTIONS = ("batchmean", "sum", "none")
F64 = torch.float64


# ----------------------------------------------------------------------------- the reference


def ref_rows(s: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None, *, temperature: float = 1.0,
             alpha: float = 0.0, divergence: str = "forward_kl", beta: float = 0.5, ignore_index: int = -100,
             softcap: float | None = None) -> torch.Tensor:
    """Per-row loss of ``[N, V]`` float64 student / teacher logits (ignored rows: 0)."""
    counted = torch.ones(s.shape[0], dtype=torch.bool) if labels is None else labels != ignore_index
    if softcap is not None:
        s, t = softcap * torch.tanh(s / softcap), softcap * torch.tanh(t / softcap)
    log_q = torch.log_softmax(s / temperature, dim=-1)   # student
    log_p = torch.log_softmax(t / temperature, dim=-1)   # teacher
    if divergence == "forward_kl":
        d = (log_p.exp() * (log_p - log_q)).sum(-1)
    elif divergence == "reverse_kl":
        d = (log_q.exp() * (log_q - log_p)).sum(-1)
    else:
        log_m = torch.logsumexp(torch.stack([log_p + math.log(beta), log_q + math.log(1 - beta)]), dim=0)
        d = (beta * (log_p.exp() * (log_p - log_m)).sum(-1)
             + (1 - beta) * (log_q.exp() * (log_q - log_m)).sum(-1))
    rows = (1 - alpha) * temperature ** 2 * d
    if alpha > 0:
        y = torch.where(counted, labels, 0)
        rows = rows + alpha * (torch.logsumexp(s, dim=-1) - s.gather(1, y[:, None]).squeeze(1))
    return torch.where(counted, rows, torch.zeros_like(rows))


def reduce(rows: torch.Tensor, labels: torch.Tensor | None, reduction: str, ignore_index: int = -100):
    if reduction == "none":
        return rows
    if reduction == "sum":
        return rows.sum()
    count = rows.numel() if labels is None else int((labels != ignore_index).sum())
    return rows.sum() / max(count, 1)


def ref_loss(hs, ws, sb, ht, wt, tb, labels=None, *, reduction="batchmean", **opts):
    """float64 loss of the two linear heads; ``hs``, ``ws``, ``sb`` may require grad."""
    hdim = hs.shape[-1]
    s = hs.reshape(-1, hdim) @ ws.t()
    t = ht.reshape(-1, ht.shape[-1]).cpu().to(F64) @ wt.cpu().to(F64).t()
    if sb is not None:
        s = s + sb
    if tb is not None:
        t = t + tb.cpu().to(F64)
    lab = None if labels is None else labels.reshape(-1).long().cpu()
    loss = reduce(ref_rows(s, t, lab, **opts), lab, reduction, opts.get("ignore_index", -100))
    return loss.reshape(hs.shape[:-1]) if reduction == "none" else loss


def leaf64(x: torch.Tensor | None) -> torch.Tensor | None:
    return None if x is None else x.detach().cpu().to(F64).requires_grad_(True)


def run_fused(hs, ws, sb, ht, wt, tb, labels=None, *, grad_seed=1, fn=None, **opts):
    """Loss and the gradients (hidden, weight, bias) of the fused function under a random
    incoming gradient; the inputs are used as given (views kept)."""
    hs, ws = hs.detach().requires_grad_(True), ws.detach().requires_grad_(True)
    sb = None if sb is None else sb.detach().requires_grad_(True)
    fn = fn or kdfast.fused_linear_kd_loss
    loss = fn(hs, ws, ht, wt, labels, student_bias=sb, teacher_bias=tb, **opts)
    go = torch.randn(loss.shape, generator=torch.Generator().manual_seed(grad_seed), dtype=F64)
    loss.backward(go.to(loss.device, loss.dtype))
    return loss.detach(), go, hs.grad, ws.grad, None if sb is None else sb.grad


def ref_grads(hs, ws, sb, ht, wt, tb, labels, go, **opts):
    h64, w64, b64 = leaf64(hs), leaf64(ws), leaf64(sb)
    loss = ref_loss(h64, w64, b64, ht, wt, tb, labels, **opts)
    inputs = [x for x in (h64, w64, b64) if x is not None]
    grads = torch.autograd.grad(loss, inputs, go)
    return loss.detach(), grads[0], grads[1], grads[2] if b64 is not None else None


def close(actual, expected, what, rtol=1e-5, atol_scale=1e-6):
    """``actual`` (any dtype) against a float64 ``expected``, atol relative to its largest entry."""
    expected = expected.detach()
    scale = float(expected.abs().max()) if expected.numel() else 0.0
    torch.testing.assert_close(actual.detach().cpu().to(F64), expected.cpu(), rtol=rtol,
                               atol=atol_scale * max(scale, 1.0), msg=lambda m: f"{what}: {m}")


def check(hs, ws, sb, ht, wt, tb, labels=None, *, rtol=1e-5, atol_scale=1e-6, **opts):
    loss, go, gh, gw, gb = run_fused(hs, ws, sb, ht, wt, tb, labels, **opts)
    opts.pop("chunk_size", None)
    ref, rgh, rgw, rgb = ref_grads(hs, ws, sb, ht, wt, tb, labels, go, **opts)
    acc = F64 if hs.dtype == F64 else torch.float32
    assert loss.dtype == acc and loss.shape == ref.shape
    close(loss, ref, "loss", rtol, atol_scale)
    assert gh.shape == hs.shape and gh.dtype == hs.dtype and gw.shape == ws.shape and gw.dtype == ws.dtype
    close(gh, rgh, "grad student_hidden", rtol, atol_scale)
    close(gw, rgw, "grad student_weight", rtol, atol_scale)
    if sb is not None:
        assert gb.shape == sb.shape and gb.dtype == sb.dtype
        close(gb, rgb, "grad student_bias", rtol, atol_scale)
    return loss, gh, gw, gb


def heads(n, v, hs_dim, ht_dim, *, lead=None, dtype=torch.float32, tdtype=None, sbias=True, tbias=True,
          ignore_every=3, scale=1.0, device="cpu"):
    """Random hidden states / weights / biases (logits of a few units) and labels with
    every ``ignore_every``-th row ignored (0: none)."""
    lead = (n,) if lead is None else lead
    tdtype = tdtype or dtype
    hs = torch.randn(*lead, hs_dim, dtype=dtype)
    ws = (torch.randn(v, hs_dim) * scale / math.sqrt(hs_dim)).to(dtype)
    ht = torch.randn(*lead, ht_dim, dtype=tdtype)
    wt = (torch.randn(v, ht_dim) * 1.5 * scale / math.sqrt(ht_dim)).to(tdtype)
    sb = (torch.randn(v) * 0.5).to(dtype) if sbias else None
    tb = (torch.randn(v) * 0.5).to(tdtype) if tbias else None
    labels = torch.randint(0, v, lead)
    if ignore_every:
        labels.view(-1)[1::ignore_every] = -100
    return tuple(None if x is None else x.to(device) for x in (hs, ws, sb, ht, wt, tb, labels))


# ----------------------------------------------------------------------------- values and gradients

SHAPES = [(1, 3, 4, 6), (7, 101, 8, 5), (37, 1000, 6, 9), (130, 101, 5, 7)]


@pytest.mark.parametrize("n, v, hs_dim, ht_dim", SHAPES, ids=lambda x: str(x))
@pytest.mark.parametrize("chunk", ["1", "7", "N", "N+5", "None"])
def test_against_reference_shapes_and_chunks(device, n, v, hs_dim, ht_dim, chunk):
    i = SHAPES.index((n, v, hs_dim, ht_dim))
    chunk_size = {"1": 1, "7": 7, "N": n, "N+5": n + 5, "None": None}[chunk]
    hs, ws, sb, ht, wt, tb, labels = heads(n, v, hs_dim, ht_dim, sbias=i % 2 == 0, tbias=i != 1,
                                           device=device)
    check(hs, ws, sb, ht, wt, tb, labels, chunk_size=chunk_size, temperature=(1.0, 2.0, 0.7, 3.0)[i],
          alpha=0.3, divergence=DIVERGENCES[i % 3], reduction=REDUCTIONS[i % 3])


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("softcap", [None, 2.5])
def test_options(device, divergence, reduction, softcap):
    hs, ws, sb, ht, wt, tb, labels = heads(13, 101, 8, 12, scale=3.0, device=device)
    for alpha, temperature, beta in ((0.0, 1.0, 0.5), (0.4, 2.0, 0.2), (1.0, 0.5, 0.9)):
        check(hs, ws, sb, ht, wt, tb, labels, chunk_size=4, divergence=divergence, reduction=reduction,
              softcap=softcap, alpha=alpha, temperature=temperature, beta=beta)


def test_the_reference_is_the_formula():
    """Spot checks of the reference itself: forward KL at T = 1 is torch's kl_div, a
    student equal to its teacher gives 0, JSD is symmetric at beta = 1/2, and T^2 scales."""
    s, t = torch.randn(5, 11, dtype=F64), torch.randn(5, 11, dtype=F64)
    kl = torch.nn.functional.kl_div(torch.log_softmax(s, -1), torch.log_softmax(t, -1), log_target=True,
                                    reduction="none").sum(-1)
    torch.testing.assert_close(ref_rows(s, t, None), kl)
    assert float(ref_rows(t, t, None, divergence="jsd").abs().max()) < 1e-12
    torch.testing.assert_close(ref_rows(s, t, None, divergence="jsd"), ref_rows(t, s, None, divergence="jsd"))
    torch.testing.assert_close(ref_rows(s, t, None, divergence="reverse_kl"), ref_rows(t, s, None))
    torch.testing.assert_close(ref_rows(2 * s, 2 * t, None, temperature=2.0), 4 * ref_rows(s, t, None))


@pytest.mark.parametrize("bias", ["none", "student", "teacher", "both"])
def test_bias_layouts(device, bias):
    hs, ws, sb, ht, wt, tb, labels = heads(19, 53, 7, 4, sbias=bias in ("student", "both"),
                                           tbias=bias in ("teacher", "both"), device=device)
    loss, _, _, gb = check(hs, ws, sb, ht, wt, tb, labels, chunk_size=5, alpha=0.2, temperature=2.0)
    assert (gb is None) == (sb is None)
    if tb is not None:  # the teacher's bias really enters the loss
        other = kdfast.fused_linear_kd_loss(hs, ws, ht, wt, labels, student_bias=sb, alpha=0.2,
                                            temperature=2.0)
        assert not torch.allclose(loss, other)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_leading_dims(device, reduction):
    hs, ws, sb, ht, wt, tb, labels = heads(0, 67, 6, 10, lead=(3, 5), device=device)
    loss = check(hs, ws, sb, ht, wt, tb, labels, chunk_size=4, reduction=reduction, alpha=0.5,
                 divergence="jsd", beta=0.3)[0]
    assert loss.shape == ((3, 5) if reduction == "none" else ())
    if reduction == "none":
        assert bool((loss[labels == -100] == 0).all())
    # the same as the flattened call, bit for bit
    flat = kdfast.fused_linear_kd_loss(hs.reshape(15, 6), ws, ht.reshape(15, 10), wt, labels.reshape(15),
                                       student_bias=sb, teacher_bias=tb, chunk_size=4, reduction=reduction,
                                       alpha=0.5, divergence="jsd", beta=0.3)
    assert torch.equal(loss.reshape(flat.shape), flat)


def test_views():
    """Transposed / strided views of the hidden states and of the weights, a strided bias."""
    hs, ws, sb, _, wt, tb, labels = heads(11, 29, 6, 5)
    hs_t = torch.randn(6, 11).t()                       # [11, 6], strides (1, 11)
    ws_t = torch.randn(6, 29).t() / 3                   # [29, 6] from an [H, V] weight
    ht_s = torch.randn(11, 10)[:, ::2]                  # [11, 5], strides (10, 2)
    wt_t = torch.randn(5, 29).t()
    sb_s = torch.randn(58)[::2]
    lead_view = torch.randn(5, 2, 6).transpose(0, 1)    # [2, 5, 6], non-contiguous leading dims
    assert not (hs_t.is_contiguous() or ws_t.is_contiguous() or ht_s.is_contiguous() or sb_s.is_contiguous())
    for chunk in (3, None):
        check(hs_t, ws_t, sb_s, ht_s, wt_t, tb, labels, chunk_size=chunk, alpha=0.3, temperature=1.5)
        check(hs, ws, sb, ht_s, wt_t, tb, labels, chunk_size=chunk, reduction="none")
        check(lead_view, ws_t, None, torch.randn(2, 5, 5), wt, None, labels[:10].reshape(2, 5),
              chunk_size=chunk, reduction="sum", alpha=0.1)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_all_rows_ignored(device, reduction):
    hs, ws, sb, ht, wt, tb, _ = heads(6, 17, 5, 4, device=device)
    labels = torch.full((6,), -100, device=device)
    loss, _, gh, gw, gb = run_fused(hs, ws, sb, ht, wt, tb, labels, reduction=reduction, alpha=0.5,
                                    chunk_size=4)
    assert bool((loss == 0).all()) and loss.shape == ((6,) if reduction == "none" else ())
    assert not gh.any() and not gw.any() and not gb.any()
    # a custom ignore_index, some rows ignored
    labels = torch.tensor([3, 7, 7, 0, 7, 16], dtype=torch.int32, device=device)  # int32 labels too
    check(hs, ws, sb, ht, wt, tb, labels, ignore_index=7, reduction=reduction, alpha=0.5, chunk_size=2)


def test_shifted_causal_lm_views():
    """A causal LM's shift: hidden states [:, :-1] (a non-contiguous view) against labels
    [:, 1:]; vocabularies of 1 and hidden sizes of 1."""
    hs, ws, sb, ht, wt, tb, labels = heads(0, 31, 6, 5, lead=(3, 8))
    check(hs[:, :-1], ws, sb, ht[:, :-1], wt, tb, labels[:, 1:], chunk_size=4, alpha=0.4, temperature=2.0)
    for v, h in ((1, 3), (5, 1)):
        hs, ws, sb, ht, wt, tb, labels = heads(7, v, h, 2)
        check(hs, ws, sb, ht, wt, tb, labels, chunk_size=3, alpha=0.5, reduction="none")


def test_ignored_rows_may_hold_anything():
    """Ignored rows are dropped before any product: NaN / inf there changes nothing."""
    hs, ws, sb, ht, wt, tb, labels = heads(9, 23, 5, 4)
    clean = run_fused(hs, ws, sb, ht, wt, tb, labels, alpha=0.3, chunk_size=2)
    hs2, ht2 = hs.clone(), ht.clone()
    hs2[labels == -100] = float("nan")
    ht2[labels == -100] = float("inf")
    dirty = run_fused(hs2, ws, sb, ht2, wt, tb, labels, alpha=0.3, chunk_size=2)
    assert torch.equal(clean[0], dirty[0])
    assert torch.equal(clean[3], dirty[3]) and torch.equal(clean[4], dirty[4])
    assert torch.equal(clean[2][labels != -100], dirty[2][labels != -100])
    assert not dirty[2][labels == -100].any()


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_masked_vocabulary_entries(divergence):
    """Padded vocabulary entries masked by a -inf bias (teacher only, or both sides): the
    loss and gradients of the float64 reference, finite, and no gradient on the masked
    entries' bias."""
    hs, ws, sb, ht, wt, tb, labels = heads(9, 40, 6, 5, ignore_every=0)
    tb[-5:] = -math.inf
    sb_masked = sb.clone()
    sb_masked[-5:] = -math.inf
    labels.clamp_(max=34)
    for student_bias in (sb, sb_masked):
        if divergence == "reverse_kl" and student_bias is sb:
            continue  # the student puts mass where the teacher has none: an infinite loss
        loss, go, gh, gw, gb = run_fused(hs, ws, student_bias, ht, wt, tb, labels, chunk_size=4, alpha=0.2,
                                         divergence=divergence, temperature=2.0)
        s = (hs.double() @ ws.double().t() + student_bias.double()).requires_grad_(True)
        t = ht.double() @ wt.double().t() + tb.double()
        ref = reduce(ref_rows_masked(s, t, labels, divergence=divergence), labels, "batchmean")
        (g,) = torch.autograd.grad(ref, s, go)
        close(loss, ref, "masked loss")
        for x in (gh, gw, gb):
            assert bool(torch.isfinite(x).all())
        close(gh, g @ ws.double(), "masked grad hidden")
        close(gw, g.t() @ hs.double(), "masked grad weight")
        close(gb, g.sum(0), "masked grad bias")
        if student_bias is sb_masked:
            assert not gb[-5:].any()


def ref_rows_masked(s, t, labels, *, divergence):
    """:func:`ref_rows` (temperature 2, alpha 0.2) for logits with -inf entries: a
    zero-probability term contributes 0 (``0 * log 0 = 0``) and no gradient."""
    log_q, log_p = torch.log_softmax(s / 2, -1), torch.log_softmax(t / 2, -1)

    def kl(log_a, log_b):
        keep = log_a > -math.inf
        return torch.where(keep, log_a.exp() * (torch.where(keep, log_a, 0) - torch.where(keep, log_b, 0)),
                           0).sum(-1)

    if divergence == "forward_kl":
        d = kl(log_p, log_q)
    elif divergence == "reverse_kl":
        d = kl(log_q, log_p)
    else:
        both = (log_p == -math.inf) & (log_q == -math.inf)
        log_m = torch.where(both, -math.inf, torch.logaddexp(torch.where(both, 0, log_p) + math.log(0.5),
                                                             torch.where(both, 0, log_q) + math.log(0.5)))
        d = 0.5 * kl(log_p, log_m) + 0.5 * kl(log_q, log_m)
    ce = torch.logsumexp(s, -1) - s.gather(1, labels[:, None]).squeeze(1)
    return 0.8 * 4 * d + 0.2 * ce


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_no_labels(device, reduction):
    hs, ws, sb, ht, wt, tb, _ = heads(10, 31, 6, 6, device=device)
    for divergence in DIVERGENCES:
        check(hs, ws, sb, ht, wt, tb, None, chunk_size=3, reduction=reduction, divergence=divergence,
              temperature=2.0)


def test_empty_batch():
    hs, ws, sb, ht, wt, tb, labels = heads(0, 13, 4, 5)
    for reduction in REDUCTIONS:
        loss, _, gh, gw, gb = run_fused(hs, ws, sb, ht, wt, tb, labels, reduction=reduction)
        assert loss.shape == ((0,) if reduction == "none" else ()) and not loss.any()
        assert gh.shape == (0, 4) and not gw.any() and not gb.any()


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_equals_kd_loss_on_materialised_logits(divergence, reduction):
    """The same value and gradients as kdfast.kd_loss on the logits (float32, through autograd
    of the two products), up to float32 rounding of a different summation order."""
    hs, ws, sb, ht, wt, tb, labels = heads(21, 211, 9, 7, scale=2.0)
    opts = dict(temperature=2.0, alpha=0.25, divergence=divergence, reduction=reduction, softcap=4.0)
    loss, go, gh, gw, gb = run_fused(hs, ws, sb, ht, wt, tb, labels, chunk_size=8, **opts)
    h, w, b = (x.clone().requires_grad_(True) for x in (hs, ws, sb))
    ref = kdfast.kd_loss(torch.addmm(b, h, w.t()), torch.addmm(tb, ht, wt.t()), labels, **opts)
    ref.backward(go.float())
    torch.testing.assert_close(loss, ref.detach(), rtol=1e-5, atol=1e-6)
    for name, a, r in (("hidden", gh, h.grad), ("weight", gw, w.grad), ("bias", gb, b.grad)):
        torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-6 * max(float(r.abs().max()), 1.0),
                                   msg=lambda m, name=name: f"grad {name}: {m}")


# ----------------------------------------------------------------------------- dtypes


def test_float64_tight(device):
    hs, ws, sb, ht, wt, tb, labels = heads(17, 97, 6, 8, dtype=F64, scale=3.0, device=device)
    for reduction in REDUCTIONS:
        check(hs, ws, sb, ht, wt, tb, labels, chunk_size=5, reduction=reduction, alpha=0.3, temperature=2.0,
              divergence="jsd", rtol=1e-10, atol_scale=1e-12)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_bfloat16(device, reduction):
    """bfloat16 heads against the float32-exact reference of the same bfloat16 values:
    the products and the logits are rounded to bfloat16, so a loose tolerance, but far
    tighter than the loss's size."""
    hs, ws, sb, ht, wt, tb, labels = heads(24, 151, 16, 12, dtype=torch.bfloat16, scale=2.0, device=device)
    loss = check(hs, ws, sb, ht, wt, tb, labels, chunk_size=5, reduction=reduction, alpha=0.2,
                 temperature=2.0, rtol=3e-2, atol_scale=3e-2)[0]
    assert loss.dtype == torch.float32
    assert float(loss.abs().max()) > 0.1  # the tolerance is not larger than what is checked


@pytest.mark.parametrize("sdtype, tdtype", [(torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16)])
def test_student_and_teacher_dtypes_differ(device, sdtype, tdtype):
    hs, ws, sb, ht, wt, tb, labels = heads(10, 57, 8, 6, dtype=sdtype, tdtype=tdtype, device=device)
    tol = 3e-2 if torch.bfloat16 in (sdtype, tdtype) else 1e-5
    check(hs, ws, sb, ht, wt, tb, labels, chunk_size=3, alpha=0.3, temperature=2.0, rtol=tol, atol_scale=tol)


def test_bfloat16_gradients_accumulate_in_float32():
    """Many chunks summed into the weight gradient: the result is as accurate as one
    bfloat16 rounding of the float32 sum, not chunk-count roundings."""
    hs, ws, sb, ht, wt, tb, labels = heads(96, 64, 16, 16, dtype=torch.bfloat16, ignore_every=0)
    _, go, _, gw1, gb1 = run_fused(hs, ws, sb, ht, wt, tb, labels, chunk_size=1, reduction="sum")
    _, _, _, gw_all, gb_all = run_fused(hs, ws, sb, ht, wt, tb, labels, chunk_size=96, reduction="sum")
    _, _, rgw, rgb = ref_grads(hs, ws, sb, ht, wt, tb, labels, go, reduction="sum")
    for name, one, whole, ref in (("weight", gw1, gw_all, rgw), ("bias", gb1, gb_all, rgb)):
        err_one = float((one.double() - ref).abs().max())
        err_whole = float((whole.double() - ref).abs().max())
        assert err_one <= 2 * err_whole + 1e-2 * float(ref.abs().max()), (name, err_one, err_whole)


# ----------------------------------------------------------------------------- autograd contract


def test_teacher_gets_no_gradient(device):
    hs, ws, sb, ht, wt, tb, labels = heads(8, 19, 5, 4, device=device)
    ht, wt, tb = (x.clone().requires_grad_(True) for x in (ht, wt, tb))
    h = hs.clone().requires_grad_(True)
    loss = kdfast.fused_linear_kd_loss(h, ws, ht, wt, labels, student_bias=sb, teacher_bias=tb)
    assert loss.requires_grad
    loss.backward()
    assert ht.grad is None and wt.grad is None and tb.grad is None
    assert h.grad is not None and h.grad.abs().sum() > 0
    # only the teacher requires grad: the loss is a constant
    assert not kdfast.fused_linear_kd_loss(hs, ws, ht, wt, labels, teacher_bias=tb).requires_grad


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_only_some_student_tensors_require_grad(reduction):
    """A frozen head (only the hidden states train), a frozen backbone (only the head), only
    the bias: each gets the reference gradient, the others none."""
    hs, ws, sb, ht, wt, tb, labels = heads(9, 21, 5, 4)
    go = torch.rand(9 if reduction == "none" else (), dtype=F64) + 0.5
    _, rgh, rgw, rgb = ref_grads(hs, ws, sb, ht, wt, tb, labels, go, reduction=reduction, alpha=0.2)
    for which in ("hidden", "weight", "bias"):
        names = ("hidden", "weight", "bias")
        h, w, b = (x.clone().requires_grad_(name == which) for x, name in zip((hs, ws, sb), names))
        loss = kdfast.fused_linear_kd_loss(h, w, ht, wt, labels, student_bias=b, teacher_bias=tb,
                                           chunk_size=4, reduction=reduction, alpha=0.2)
        loss.backward(go.float())
        got = {"hidden": h.grad, "weight": w.grad, "bias": b.grad}
        close(got.pop(which), {"hidden": rgh, "weight": rgw, "bias": rgb}[which], f"{which} only")
        assert all(g is None for g in got.values())


def _mm_counts(fn) -> dict[str, int]:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    counts: dict[str, int] = {}
    for e in prof.events():
        if e.name in ("aten::mm", "aten::addmm", "aten::addmm_"):
            counts[e.name] = counts.get(e.name, 0) + 1
    return counts


def test_products_per_chunk():
    """Per chunk: the two logit products, the hidden-state gradient product and the weight
    gradient product, nothing recomputed (3 chunks)."""
    hs, ws, _, ht, wt, _, _ = heads(12, 30, 5, 4, sbias=False, tbias=False)
    h, w = hs.clone().requires_grad_(True), ws.clone().requires_grad_(True)
    counts = _mm_counts(lambda: kdfast.fused_linear_kd_loss(h, w, ht, wt, chunk_size=4).backward())
    assert counts == {"aten::mm": 9, "aten::addmm_": 3}, counts
    counts = _mm_counts(lambda: kdfast.fused_linear_kd_loss(hs, ws, ht, wt, chunk_size=4))
    assert counts == {"aten::mm": 6}, counts  # no gradient wanted: the logits only


def test_frozen_weight_costs_no_weight_gradient():
    """A frozen LM head (LoRA, a frozen tied embedding) or frozen hidden states: only the
    wanted gradient's products run."""
    hs, ws, _, ht, wt, _, _ = heads(12, 30, 5, 4, sbias=False, tbias=False)
    h = hs.clone().requires_grad_(True)
    counts = _mm_counts(lambda: kdfast.fused_linear_kd_loss(h, ws, ht, wt, chunk_size=4).backward())
    assert counts == {"aten::mm": 9}, counts
    w = ws.clone().requires_grad_(True)
    counts = _mm_counts(lambda: kdfast.fused_linear_kd_loss(hs, w, ht, wt, chunk_size=4).backward())
    assert counts == {"aten::mm": 6, "aten::addmm_": 3}, counts


def test_no_grad_forward():
    hs, ws, sb, ht, wt, tb, labels = heads(12, 33, 6, 5)
    h, w = hs.clone().requires_grad_(True), ws.clone().requires_grad_(True)
    with_grad = kdfast.fused_linear_kd_loss(h, w, ht, wt, labels, student_bias=sb, teacher_bias=tb,
                                            chunk_size=5)
    with torch.no_grad():
        loss = kdfast.fused_linear_kd_loss(h, w, ht, wt, labels, student_bias=sb, teacher_bias=tb,
                                           chunk_size=5)
    assert not loss.requires_grad
    assert torch.equal(loss, with_grad.detach())
    close(loss, ref_loss(hs.double(), ws.double(), sb.double(), ht, wt, tb, labels), "no_grad loss")
    with pytest.raises(RuntimeError, match="does not require grad"):
        loss.backward()


def test_op_called_without_gradients_refuses_backward():
    """The op run with need_grad=False keeps no gradients: its backward says so."""
    hs, ws, _, ht, wt, _, labels = heads(5, 11, 4, 4, sbias=False, tbias=False)
    h = hs.clone().requires_grad_(True)
    loss = torch.ops.kdfast.fused_linear_kd(h, ws, None, ht, wt, None, labels, 1.0, 0.0, 0, 0.5, -100, 0.0,
                                            0, 2, False)[0]
    with pytest.raises(RuntimeError, match="fused_linear_kd_loss: the forward ran without gradients"):
        loss.backward()
    idx, val = kdfast.topk_logits(torch.randn(5, 11), 3)
    loss = torch.ops.kdfast.fused_linear_sparse_kd(h, ws, None, idx, val, labels, 1.0, 0.0, True, 0, -100, 0,
                                                   2, 0)[0]
    with pytest.raises(RuntimeError, match="fused_linear_sparse_kd_loss: the forward ran without gradients"):
        loss.backward()


def test_backward_twice_with_retain_graph():
    hs, ws, sb, ht, wt, tb, labels = heads(9, 20, 5, 4)
    for reduction in REDUCTIONS:
        h = hs.clone().requires_grad_(True)
        loss = kdfast.fused_linear_kd_loss(h, ws, ht, wt, labels, student_bias=sb, teacher_bias=tb,
                                           reduction=reduction, chunk_size=4)
        go = torch.rand(loss.shape) + 0.5
        loss.backward(go, retain_graph=True)
        first = h.grad.clone()
        loss.backward(2 * go)
        torch.testing.assert_close(h.grad, 3 * first, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_gradcheck_dense(device, reduction):
    hs, ws, sb, ht, wt, tb, labels = heads(5, 7, 3, 4, dtype=F64, scale=2.0, device=device)
    labels[1] = -100

    def fn(h, w, b):
        return kdfast.fused_linear_kd_loss(h, w, ht, wt, labels, student_bias=b, teacher_bias=tb,
                                           temperature=1.7, alpha=0.3, divergence="jsd", beta=0.3,
                                           reduction=reduction, softcap=3.0, chunk_size=2)

    assert torch.autograd.gradcheck(fn, tuple(x.requires_grad_(True) for x in (hs, ws, sb)))


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("tail", ["renormalize", "residual"])
def test_gradcheck_sparse(device, reduction, tail):
    hs, ws, sb, _, _, _, labels = heads(5, 9, 3, 3, dtype=F64, scale=2.0, device=device)
    idx, val = kdfast.topk_logits(torch.randn(5, 9, dtype=F64, device=device) * 2, 4, temperature=1.5)
    idx[2, 1] = -1
    labels[1] = -100

    def fn(h, w, b):
        return kdfast.fused_linear_sparse_kd_loss(h, w, idx, val, labels, student_bias=b, temperature=1.5,
                                                  tail=tail, alpha=0.2, reduction=reduction, chunk_size=2)

    assert torch.autograd.gradcheck(fn, tuple(x.requires_grad_(True) for x in (hs, ws, sb)))


# ----------------------------------------------------------------------------- custom ops


def _dense_op_samples():
    """fused_linear_kd arguments: (sh, sw, sb, th, tw, tb, labels, temperature, alpha,
    divergence, beta, ignore_index, softcap, reduction, chunk_size, need_grad)."""
    out = []
    for reduction in range(3):
        hs, ws, sb, ht, wt, tb, labels = heads(7, 13, 4, 5)
        hs.requires_grad_(True)
        ws.requires_grad_(True)
        sb.requires_grad_(True)
        out.append((hs, ws, sb, ht, wt, tb, labels, 2.0, 0.3, reduction, 0.4, -100, 0.0, reduction, 3, 7))
        if reduction != 1:
            out.append((hs, ws, None, ht, wt, None, None, 1.0, 0.0, 2, 0.5, -100, 3.0, 2 - reduction, 0,
                        7))
        else:
            out.append((hs.detach(), ws.detach(), sb.detach(), ht, wt, tb, labels, 0.5, 0.0, 1, 0.5, -100,
                        0.0, reduction, 7, 0))
    hb, wb, bb, htb, wtb, tbb, lb = heads(6, 9, 8, 4, dtype=torch.bfloat16, tdtype=torch.float32)
    out.append((hb.requires_grad_(True), wb, bb, htb, wtb, tbb, lb, 4.0, 0.5, 0, 0.5, -100, 0.0, 0, 4, 7))
    h64, w64, b64, ht64, wt64, tb64, _ = heads(5, 6, 3, 2, dtype=F64)
    out.append((h64.requires_grad_(True), w64, b64, ht64, wt64, tb64, torch.full((5,), -100), 1.0, 0.5, 0,
                0.5,
                -100, 0.0, 0, 2, 7))
    return out


def _sparse_op_samples():
    """fused_linear_sparse_kd arguments: (sh, sw, sb, indices, values, labels, temperature,
    alpha, logprobs, tail, ignore_index, reduction, chunk_size, need_grad)."""
    out = []
    for reduction in range(3):
        hs, ws, sb, _, _, _, labels = heads(7, 13, 4, 4)
        idx, val = kdfast.topk_logits(torch.randn(7, 13), 4, temperature=2.0)
        idx[0, 1] = -1
        hs.requires_grad_(True)
        out.append((hs, ws.requires_grad_(True), sb, idx, val, labels, 2.0, 0.3, True, reduction % 2, -100,
                    reduction, 3, 7))
        if reduction != 1:
            out.append((hs, ws, None, idx.int(), val.exp(), None, 2.0, 0.0, False, 1, -100, 2 - reduction, 0,
                        7))
        else:
            out.append((hs.detach(), ws.detach(), sb, idx, val, labels, 2.0, 0.0, True, 0, -100, reduction, 2,
                        0))
    hb, wb, bb, _, _, _, lb = heads(6, 9, 8, 4, dtype=torch.bfloat16)
    idx, val = kdfast.topk_logits(torch.randn(6, 9), 3)
    out.append((hb.requires_grad_(True), wb, bb, idx, val.bfloat16(), lb, 1.0, 0.5, True, 1, -100, 0, 4,
                7))
    return out


def test_opcheck_dense_ops():
    for args in _dense_op_samples():
        torch.library.opcheck(torch.ops.kdfast.fused_linear_kd.default, args)
        sh, sw, sb, th, tw, tb, labels, temperature, alpha, div, beta, ignore, cap, _, chunk, _ = args
        grad_loss = torch.randn(sh.shape[0], dtype=F64 if sh.dtype == F64 else torch.float32)
        torch.library.opcheck(torch.ops.kdfast.fused_linear_kd_backward.default,
                              (grad_loss, sh.detach(), sw.detach(), None if sb is None else sb.detach(), th,
                               tw, tb, labels, temperature, alpha, div, beta, ignore, cap, chunk,
                               7 if sb is not None else 3))


def test_opcheck_sparse_ops():
    for args in _sparse_op_samples():
        torch.library.opcheck(torch.ops.kdfast.fused_linear_sparse_kd.default, args)
        sh, sw, sb, idx, val, labels, temperature, alpha, logprobs, tail, ignore, _, chunk, _ = args
        grad_loss = torch.randn(sh.shape[0], dtype=torch.float32)
        torch.library.opcheck(torch.ops.kdfast.fused_linear_sparse_kd_backward.default,
                              (grad_loss, sh.detach(), sw.detach(), None if sb is None else sb.detach(), idx,
                               val, labels, temperature, alpha, logprobs, tail, ignore, chunk,
                               7 if sb is not None else 3))


def test_opcheck_transposed_weight():
    """An LM head stored as [H, V] and passed as ``weight.t()``."""
    hs = torch.randn(7, 5, requires_grad=True)
    ws = torch.randn(5, 11).t().requires_grad_(True)
    sb = torch.randn(22)[::2].requires_grad_(True)
    ht, wt = torch.randn(7, 4), torch.randn(11, 4)
    idx, val = kdfast.topk_logits(torch.randn(7, 11), 3)
    go = torch.rand(7)
    torch.library.opcheck(torch.ops.kdfast.fused_linear_kd_backward.default,
                          (go, hs.detach(), ws.detach(), sb.detach(), ht, wt, None, None, 1.0, 0.0, 0, 0.5,
                           -100, 0.0, 3, 7))
    torch.library.opcheck(torch.ops.kdfast.fused_linear_sparse_kd_backward.default,
                          (go, hs.detach(), ws.detach(), None, idx, val, None, 1.0, 0.0, True, 0, -100, 3, 3))
    for reduction in range(3):
        torch.library.opcheck(torch.ops.kdfast.fused_linear_sparse_kd.default,
                              (hs, ws, sb, idx, val, None, 1.0, 0.0, True, 0, -100, reduction, 3, 7))
        torch.library.opcheck(torch.ops.kdfast.fused_linear_kd.default,
                              (hs, ws, sb, ht, wt, None, None, 1.0, 0.0, 0, 0.5, -100, 0.0, reduction, 3,
                               7))


def test_compile_transposed_weight(fresh_dynamo):
    """The same layout under torch.compile: inductor checks the op's outputs against the fake strides."""
    hs, wbase = torch.randn(7, 5, requires_grad=True), torch.randn(5, 11, requires_grad=True)
    ht, wt = torch.randn(7, 4), torch.randn(11, 4)

    def fn(h, w):
        return kdfast.fused_linear_kd_loss(h, w.t(), ht, wt, chunk_size=3) * 2.0

    torch.compile(fn, fullgraph=True, backend="inductor")(hs, wbase).backward()
    h, w = hs.detach().clone().requires_grad_(True), wbase.detach().clone().requires_grad_(True)
    fn(h, w).backward()
    torch.testing.assert_close(hs.grad, h.grad)
    torch.testing.assert_close(wbase.grad, w.grad)


def test_ops_outputs():
    """The forward op's kept gradients are those of the loss at an incoming gradient of 1;
    the recomputing backward op with per-row weights gives the weighted gradients."""
    hs, ws, sb, ht, wt, tb, labels = heads(9, 15, 4, 6)
    op = torch.ops.kdfast.fused_linear_kd
    loss, gh, gw, gb = op(hs, ws, sb, ht, wt, tb, labels, 2.0, 0.3, 0, 0.5, -100, 0.0, 1, 4, 7)
    one = torch.tensor(1.0, dtype=F64)
    _, rgh, rgw, rgb = ref_grads(hs, ws, sb, ht, wt, tb, labels, one, temperature=2.0, alpha=0.3,
                                 reduction="sum")
    for name, a, r in (("hidden", gh, rgh), ("weight", gw, rgw), ("bias", gb, rgb)):
        close(a, r, name)
    weights = torch.rand(9)
    bh, bw, bb = torch.ops.kdfast.fused_linear_kd_backward(weights, hs, ws, sb, ht, wt, tb, labels, 2.0, 0.3,
                                                           0, 0.5, -100, 0.0, 4, 7)
    _, rgh, rgw, rgb = ref_grads(hs, ws, sb, ht, wt, tb, labels, weights.double(), temperature=2.0, alpha=0.3,
                                 reduction="none")
    for name, a, r in (("hidden", bh, rgh), ("weight", bw, rgw), ("bias", bb, rgb)):
        close(a, r, f"backward {name}")
    loss0, gh0, gw0, gb0 = op(hs, ws, sb, ht, wt, tb, labels, 2.0, 0.3, 0, 0.5, -100, 0.0, 1, 4, 0)
    assert torch.equal(loss0, loss) and gh0.numel() == gw0.numel() == gb0.numel() == 0


def test_compile_training_step(fresh_dynamo):
    """torch.compile(fullgraph=True, inductor) of a student (a projection, tanh, the fused
    head loss): three SGD steps give the eager steps' losses and weights, and the loss goes down."""
    torch.set_num_threads(1)
    hs, ws, sb, ht, wt, tb, labels = heads(12, 37, 8, 6)
    proj = torch.randn(8, 8) / 3

    def loss_fn(p, w, b):
        return kdfast.fused_linear_kd_loss(torch.tanh(hs @ p), w, ht, wt, labels, student_bias=b,
                                           teacher_bias=tb, temperature=2.0, alpha=0.2, chunk_size=5)

    def train(fn):
        params = [torch.nn.Parameter(x.clone()) for x in (proj, ws, sb)]
        opt = torch.optim.SGD(params, lr=0.5)
        losses = []
        for _ in range(3):
            opt.zero_grad()
            loss = fn(*params)
            loss.backward()
            opt.step()
            losses.append(loss.detach())
        return torch.stack(losses), params

    start = time.perf_counter()
    got, params_c = train(torch.compile(loss_fn, fullgraph=True, backend="inductor"))
    elapsed = time.perf_counter() - start
    eager, params_e = train(loss_fn)
    assert eager[-1] < eager[0]
    torch.testing.assert_close(got, eager, rtol=1e-5, atol=1e-6)
    for a, b in zip(params_c, params_e):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-5, atol=1e-6)
    assert elapsed < 60, f"inductor compile took {elapsed:.0f} s"


def test_compile_sparse_and_none_reduction(fresh_dynamo):
    hs, ws, sb, _, _, _, labels = heads(10, 21, 5, 5)
    idx, val = kdfast.topk_logits(torch.randn(10, 21), 5)

    def fn(h, w, b):
        return kdfast.fused_linear_sparse_kd_loss(h, w, idx, val, labels, student_bias=b, tail="residual",
                                                  reduction="none", chunk_size=3)

    go = torch.rand(10)
    outs = []
    for f in (fn, torch.compile(fn, fullgraph=True, backend="aot_eager")):
        h, w, b = (x.clone().requires_grad_(True) for x in (hs, ws, sb))
        loss = f(h, w, b)
        loss.backward(go)
        outs.append((loss.detach(), h.grad, w.grad, b.grad))
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


# ----------------------------------------------------------------------------- sparse teacher


def run_sparse(hs, ws, sb, idx, val, labels, *, grad_seed=2, **opts):
    h, w = hs.clone().requires_grad_(True), ws.clone().requires_grad_(True)
    b = None if sb is None else sb.clone().requires_grad_(True)
    loss = kdfast.fused_linear_sparse_kd_loss(h, w, idx, val, labels, student_bias=b, **opts)
    go = torch.randn(loss.shape, generator=torch.Generator().manual_seed(grad_seed)).to(loss.device)
    loss.backward(go)
    return loss.detach(), go, h.grad, w.grad, None if b is None else b.grad


def materialised_sparse(hs, ws, sb, idx, val, labels, go, **opts):
    opts.pop("chunk_size", None)
    h, w = hs.clone().requires_grad_(True), ws.clone().requires_grad_(True)
    b = None if sb is None else sb.clone().requires_grad_(True)
    s = h @ w.t() if b is None else (h @ w.t() + b)
    loss = kdfast.sparse_kd_loss(s, idx, val, labels, **opts)
    loss.backward(go)
    return loss.detach(), h.grad, w.grad, None if b is None else b.grad


@pytest.mark.parametrize("source", ["topk", "sample"])
@pytest.mark.parametrize("tail", ["renormalize", "residual"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_sparse_against_sparse_kd_loss(device, source, tail, reduction):
    hs, ws, sb, _, _, _, labels = heads(0, 83, 7, 7, lead=(3, 9), scale=2.0, device=device)
    teacher = torch.randn(3, 9, 83).to(device) * 2
    if source == "topk":
        idx, val = kdfast.topk_logits(teacher, 6, temperature=2.0)
        idx[:, ::4, -1] = -1                            # padding in some rows
        kind = "logprobs"
    else:
        gen = torch.Generator().manual_seed(3)
        idx, val = kdfast.sample_logits(teacher, 12, temperature=2.0, generator=gen)
        kind = "probs"
        assert bool((idx == -1).any())                  # the sampler pads
    opts = dict(values=kind, temperature=2.0, tail=tail, alpha=0.3, reduction=reduction)
    for chunk in (1, 7, 27, 32, None):
        loss, go, gh, gw, gb = run_sparse(hs, ws, sb, idx, val, labels, chunk_size=chunk, **opts)
        ref, rgh, rgw, rgb = materialised_sparse(hs, ws, sb, idx, val, labels, go, **opts)
        torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
        for name, a, r in (("hidden", gh, rgh), ("weight", gw, rgw), ("bias", gb, rgb)):
            torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-6 * max(float(r.abs().max()), 1.0),
                                       msg=lambda m, name=name, c=chunk: f"{c} grad {name}: {m}")
    # and against the independent float64 sparse reference of the tests
    s64 = (hs.cpu().double().reshape(27, 7) @ ws.cpu().double().t() + sb.cpu().double()).reshape(3, 9, 83)
    expected = ref_sparse(s64, idx.cpu(), val.cpu().double(), labels.cpu(), values_kind=kind, temperature=2.0,
                          tail=tail, alpha=0.3, reduction=reduction)
    close(loss, expected, "sparse vs float64 reference", rtol=1e-5)


def test_sparse_without_labels_bias_and_bfloat16():
    hs, ws, _, _, _, _, _ = heads(20, 64, 8, 8, sbias=False)
    idx, val = kdfast.topk_logits(torch.randn(20, 64) * 3, 5)
    loss, go, gh, gw, gb = run_sparse(hs, ws, None, idx, val, None, chunk_size=6)
    ref, rgh, rgw, _ = materialised_sparse(hs, ws, None, idx, val, None, go)
    assert gb is None
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gh, rgh, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(gw, rgw, rtol=1e-4, atol=1e-6)
    hb, wb = hs.bfloat16(), ws.bfloat16()
    loss_b, go, gh_b, gw_b, _ = run_sparse(hb, wb, None, idx, val, None, chunk_size=6, reduction="sum")
    ref_b = ref_sparse(hb.double() @ wb.double().t(), idx, val.double(), None, reduction="sum")
    close(loss_b, ref_b, "bf16 sparse loss", rtol=3e-2, atol_scale=3e-2)
    s = (hb.double() @ wb.double().t()).requires_grad_(True)
    g = torch.autograd.grad(ref_sparse(s, idx, val.double(), None, reduction="sum"), s)[0] * go.double()[...]
    close(gh_b, g @ wb.double(), "bf16 sparse grad hidden", rtol=3e-2, atol_scale=3e-2)
    close(gw_b, g.t() @ hb.double(), "bf16 sparse grad weight", rtol=3e-2, atol_scale=3e-2)


def test_sparse_all_rows_ignored():
    hs, ws, sb, _, _, _, _ = heads(5, 12, 4, 4)
    idx, val = kdfast.topk_logits(torch.randn(5, 12), 3)
    loss, _, gh, gw, gb = run_sparse(hs, ws, sb, idx, val, torch.full((5,), -100), alpha=0.5)
    assert loss == 0 and not gh.any() and not gw.any() and not gb.any()


# ----------------------------------------------------------------------------- modules


def test_modules_equal_functions():
    hs, ws, sb, ht, wt, tb, labels = heads(0, 41, 6, 5, lead=(2, 7))
    opts = dict(temperature=2.0, alpha=0.3, divergence="reverse_kl", reduction="none", softcap=5.0,
                chunk_size=4)
    crit = kdfast.FusedLinearKDLoss(**opts)
    assert "chunk_size=4" in repr(crit) and "reverse_kl" in repr(crit)
    a = run_fused(hs, ws, sb, ht, wt, tb, labels, fn=crit)
    b = run_fused(hs, ws, sb, ht, wt, tb, labels, **opts)
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    idx, val = kdfast.topk_logits(torch.randn(2, 7, 41), 4, temperature=2.0)
    sopts = dict(temperature=2.0, tail="residual", alpha=0.1, reduction="sum", chunk_size=3)
    scrit = kdfast.FusedLinearSparseKDLoss(**sopts)
    h1, h2 = hs.clone().requires_grad_(True), hs.clone().requires_grad_(True)
    l1 = scrit(h1, ws, idx, val, labels, student_bias=sb)
    l2 = kdfast.fused_linear_sparse_kd_loss(h2, ws, idx, val, labels, student_bias=sb, **sopts)
    l1.backward()
    l2.backward()
    assert torch.equal(l1, l2) and torch.equal(h1.grad, h2.grad)
    assert list(crit.parameters()) == [] and list(scrit.parameters()) == []


def test_training_through_the_module_lowers_the_loss():
    """A small student head distilled from a fixed teacher head on the digits data."""
    from sklearn.datasets import load_digits

    x = torch.tensor(load_digits().data[:256], dtype=torch.float32) / 16
    teacher = torch.nn.Linear(64, 10)
    torch.nn.init.normal_(teacher.weight, std=0.5)
    student = torch.nn.Sequential(torch.nn.Linear(64, 16), torch.nn.Tanh())
    head = torch.nn.Linear(16, 10)
    crit = kdfast.FusedLinearKDLoss(temperature=2.0, chunk_size=48)
    opt = torch.optim.Adam([*student.parameters(), *head.parameters()], lr=0.05)
    losses = []
    for _ in range(30):
        opt.zero_grad()
        loss = crit(student(x), head.weight, x, teacher.weight, student_bias=head.bias,
                    teacher_bias=teacher.bias)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.3 * losses[0]


# ----------------------------------------------------------------------------- bad arguments


def _bad_dense_cases():
    hs, ws, sb, ht, wt, tb, labels = heads(6, 10, 4, 5)
    return [
        ((hs, ws[:9], ht, wt), {}, ValueError, "the vocabulary sizes differ"),
        ((hs, ws[:, :3], ht, wt), {}, ValueError, "the hidden size of student_hidden"),
        ((hs, ws, ht, wt[:, :4]), {}, ValueError, "the hidden size of teacher_hidden"),
        ((hs, ws, ht[:5], wt), {}, ValueError, "student_hidden and teacher_hidden must have the"),
        ((hs.half(), ws.half(), ht, wt), {}, TypeError, "student_hidden must be float32, bfloat16 or"),
        ((hs, ws, ht.half(), wt.half()), {}, TypeError, "teacher_hidden must be float32, bfloat16 or"),
        ((hs, ws.double(), ht, wt), {}, TypeError, "student_hidden and student_weight must have one dtype"),
        ((hs, ws, ht, wt.bfloat16()), {}, TypeError, "teacher_hidden and teacher_weight must have one dtype"),
        ((hs.int(), ws, ht, wt), {}, TypeError, "student_hidden must be float32"),
        ((hs.numpy(), ws, ht, wt), {}, TypeError, "student_hidden must be a tensor"),
        ((hs, ws[0], ht, wt), {}, ValueError, "student_hidden must be \\[..., H\\] and student_weight"),
        ((hs, ws, ht, wt), {"student_bias": sb[:9]}, ValueError, "student_bias must be a \\[V\\] = \\[10\\]"),
        ((hs, ws, ht, wt), {"teacher_bias": tb[None]}, ValueError, "teacher_bias must be a \\[V\\]"),
        ((hs, ws, ht, wt), {"student_bias": sb.double()}, TypeError, "student_bias must have student_weight"),
        ((hs, ws, ht, wt, labels[:5]), {}, ValueError, "labels must have the hidden states' leading shape"),
        ((hs, ws, ht, wt, labels.float()), {}, TypeError, "labels must be an int64"),
        ((hs, ws, ht, wt), {"alpha": 0.5}, ValueError, "labels are needed when alpha > 0"),
        ((hs, ws, ht, wt), {"chunk_size": 0}, ValueError, "chunk_size must be an int >= 1 or None"),
        ((hs, ws, ht, wt), {"chunk_size": True}, ValueError, "chunk_size must be an int >= 1 or None"),
        ((hs, ws, ht, wt), {"chunk_size": 2.0}, ValueError, "chunk_size must be an int >= 1 or None"),
        ((hs, ws.to("meta"), ht, wt), {}, ValueError, "student_hidden and student_weight are on different"),
        ((hs, ws, ht.to("meta"), wt.to("meta")), {}, ValueError, "the student is on cpu, the teacher on"),
        ((hs, ws, ht, wt, labels.to("meta")), {}, ValueError, "labels are on meta"),
        ((hs, ws, ht, wt), {"divergence": "kl"}, ValueError, "divergence must be one of"),
        ((hs, ws, ht, wt), {"reduction": "mean"}, ValueError, "reduction must be one of"),
        ((hs, ws, ht, wt), {"temperature": 0.0}, ValueError, "temperature must be finite and > 0"),
        ((hs, ws, ht, wt), {"softcap": -1.0}, ValueError, "softcap must be finite and > 0"),
        ((hs, ws, ht, wt), {"divergence": "jsd", "beta": 1.0}, ValueError, "beta must be in \\(0, 1\\)"),
    ]


@pytest.mark.parametrize("case", range(len(_bad_dense_cases())))
def test_bad_arguments_dense(case):
    args, kwargs, error, match = _bad_dense_cases()[case]
    with pytest.raises(error, match=match) as info:
        kdfast.fused_linear_kd_loss(*args, **kwargs)
    assert str(info.value).startswith(("fused_linear_kd_loss: ", "kd_loss: "))  # the options' shared checks


def test_bad_arguments_modules():
    with pytest.raises(ValueError, match="FusedLinearKDLoss: chunk_size must be an int >= 1"):
        kdfast.FusedLinearKDLoss(chunk_size=0)
    with pytest.raises(ValueError, match="FusedLinearSparseKDLoss: chunk_size must be an int >= 1"):
        kdfast.FusedLinearSparseKDLoss(chunk_size=-3)
    with pytest.raises(ValueError, match="divergence must be one of"):
        kdfast.FusedLinearKDLoss(divergence="js")
    with pytest.raises(ValueError, match="tail must be one of"):
        kdfast.FusedLinearSparseKDLoss(tail="drop")


def test_float64_mixed_with_float32_is_refused():
    hs, ws, _, ht, wt, _, _ = heads(4, 8, 3, 3)
    with pytest.raises(RuntimeError, match="float64"):
        kdfast.fused_linear_kd_loss(hs.double(), ws.double(), ht, wt)
    idx, val = kdfast.topk_logits(torch.randn(4, 8), 2)
    with pytest.raises(RuntimeError, match="float64"):
        kdfast.fused_linear_sparse_kd_loss(hs, ws, idx, val.double())


def test_bad_arguments_sparse():
    hs, ws, sb, _, _, _, labels = heads(6, 10, 4, 4)
    idx, val = kdfast.topk_logits(torch.randn(6, 10), 3)
    cases = [
        ((hs, ws, idx[:5], val[:5]), {}, ValueError, "teacher_indices must be \\[..., K\\] with the hidden"),
        ((hs, ws, idx, val[:, :2]), {}, ValueError, "teacher_indices and teacher_values must have the same"),
        ((hs, ws, idx.float(), val), {}, TypeError, "teacher_indices must be integer"),
        ((hs, ws, idx, val.long()), {}, TypeError, "and teacher_values floating point"),
        ((hs, ws, idx.tolist(), val), {}, TypeError, "teacher_indices must be a tensor"),
        ((hs, ws, idx, val.to("meta")), {}, ValueError, "teacher_values is on meta"),
        ((hs, ws[:, :3], idx, val), {}, ValueError, "the hidden size of student_hidden"),
        ((hs.half(), ws.half(), idx, val), {}, TypeError, "student_hidden must be float32, bfloat16 or"),
        ((hs, ws.bfloat16(), idx, val), {}, TypeError, "student_hidden and student_weight must have one"),
        ((hs, ws, idx, val), {"student_bias": sb[:3]}, ValueError, "student_bias must be a \\[V\\]"),
        ((hs, ws, idx, val, labels[None]), {}, ValueError, "labels must have the hidden states' leading"),
        ((hs, ws, idx, val), {"alpha": 0.1}, ValueError, "labels are needed when alpha > 0"),
        ((hs, ws, idx, val), {"chunk_size": 0}, ValueError, "chunk_size must be an int >= 1 or None"),
        ((hs, ws, idx, val), {"values": "logits"}, ValueError, "values must be one of"),
        ((hs, ws, idx + 10, val), {}, ValueError, "teacher_indices must be in \\[0, 10\\) or -1"),
    ]
    for args, kwargs, error, match in cases:
        with pytest.raises(error, match=match) as info:
            kdfast.fused_linear_sparse_kd_loss(*args, **kwargs)
        assert str(info.value).startswith(("fused_linear_sparse_kd_loss: ", "sparse_kd_loss: "))


def test_labels_out_of_range():
    hs, ws, _, ht, wt, _, _ = heads(4, 8, 3, 3)
    with pytest.raises(ValueError, match="labels must be in \\[0, 8\\)"):
        kdfast.fused_linear_kd_loss(hs, ws, ht, wt, torch.tensor([0, 8, 1, 2]), alpha=0.5)


# ----------------------------------------------------------------------------- chunk sizes


def test_auto_chunk_size_arithmetic():
    cpu = torch.device("cpu")
    budget = fused_linear.CPU_CHUNK_BYTES
    assert fused_linear.auto_chunk_size(8192, 49152, 12, cpu) == 512     # the docstring's example
    raw = budget // (49152 * 12)
    assert fused_linear.auto_chunk_size(10 ** 6, 49152, 12, cpu) == raw - raw % 16
    assert fused_linear.auto_chunk_size(10, 49152, 12, cpu) == 10        # never more than the rows
    assert fused_linear.auto_chunk_size(0, 49152, 12, cpu) == 1
    assert fused_linear.auto_chunk_size(10 ** 6, budget // 12 // 9, 12, cpu) == 9   # <= 16: not rounded
    assert fused_linear.auto_chunk_size(10 ** 6, budget // 12 // 40, 12, cpu) == 32  # > 16: down to 16k
    assert fused_linear.auto_chunk_size(10 ** 6, 10 ** 9, 12, cpu) == 1               # always >= 1
    for rows, vocab, bpl in ((4096, 49152, 12), (8192, 128256, 6), (100, 3, 16)):
        c = fused_linear.auto_chunk_size(rows, vocab, bpl, cpu)
        assert 1 <= c <= rows and (c * vocab * bpl <= budget or c == 1)
        assert c == rows or c <= 16 or c % 16 == 0


def test_auto_chunk_matches_explicit_chunks():
    """chunk_size=None is some chunking: the same loss as an explicit chunk size (up to
    summation order), and one chunk when everything fits."""
    hs, ws, sb, ht, wt, tb, labels = heads(40, 50, 5, 5)
    auto = kdfast.fused_linear_kd_loss(hs, ws, ht, wt, labels, student_bias=sb, teacher_bias=tb)
    whole = kdfast.fused_linear_kd_loss(hs, ws, ht, wt, labels, student_bias=sb, teacher_bias=tb,
                                        chunk_size=40)
    assert torch.equal(auto, whole)


def test_docstring_examples():
    finder = doctest.DocTestFinder()
    found = finder.find(fused_linear, "kdfast.fused_linear", extraglobs={"torch": torch, "kdfast": kdfast})
    tests = [t for t in found if t.examples]
    assert len(tests) >= 5
    for test in tests:
        runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
        runner.run(test)
        result = runner.summarize(verbose=False)
        assert result.failed == 0, f"{test.name}: {result.failed} of {result.attempted} examples failed"
