"""Numerical safety of every divergence (JSD's mixture ``log m`` above all) where
probabilities underflow: rows whose tail probabilities are denormal or zero in float32,
logits of +-1e4, temperatures of 0.05 and 100, float16 / bfloat16 inputs with large
ranges. Loss (through both the no-grad and the gradient path) and both gradients must
be finite where the float64 reference is, and close to it; on CPU with denormals and
with ``torch.set_flush_denormal(True)``, and on CUDA."""

from __future__ import annotations

import math

import pytest
import torch
from fp64_reference import ref_loss_and_grads, soft_cap
from kd_helpers import (
    assert_close_fp32,
    assert_within_eager_error,
    check_against_reference,
    eager_loss_and_grads,
    fp32_tolerances,
    kernel_loss_and_grads,
    logits,
)

import kdfast

INF = math.inf

# (divergence, beta): every divergence; JSD with three mixture weights.
SETTINGS = [
    pytest.param("forward_kl", 0.5, id="forward_kl"),
    pytest.param("reverse_kl", 0.5, id="reverse_kl"),
    pytest.param("jsd", 0.1, id="jsd-beta0.1"),
    pytest.param("jsd", 0.5, id="jsd-beta0.5"),
    pytest.param("jsd", 0.9, id="jsd-beta0.9"),
]


def _flush_denormal_is_on() -> bool:
    """True when float32 results below the normal range are flushed to zero here."""
    return float(torch.tensor(1e-30) * torch.tensor(1e-10)) == 0.0


@pytest.fixture(params=[False, True], ids=["denormals", "flush_denormal"])
def flush_denormal(request, device):
    """Runs the test normally, then with the CPU in flush-to-zero / denormals-are-zero
    mode; the previous mode and thread count are restored afterwards."""
    if not request.param:
        yield False
        return
    if device != "cpu":
        pytest.skip("torch.set_flush_denormal is a CPU setting")
    was_on = _flush_denormal_is_on()
    threads = torch.get_num_threads()
    if not torch.set_flush_denormal(True):
        pytest.skip("flush-denormal mode is not supported on this CPU")
    # The mode is per thread: one thread keeps every kernel on the thread that set it.
    torch.set_num_threads(1)
    try:
        assert _flush_denormal_is_on()
        yield True
    finally:
        torch.set_flush_denormal(was_on)
        torch.set_num_threads(threads)
    assert _flush_denormal_is_on() == was_on


def _infinite_only_through_tiny_mass(student, teacher, temperature, divergence):
    """Rows whose KL is +inf only through weights below 16x float32's smallest normal
    (``p_j > 0 = q_j`` for forward KL, ``q_j > 0 = p_j`` for reverse KL)."""
    vocab = student.shape[-1]
    log_q = torch.log_softmax(student.double().reshape(-1, vocab) / temperature, -1)
    log_p = torch.log_softmax(teacher.double().reshape(-1, vocab) / temperature, -1)
    if divergence == "forward_kl":
        log_w, log_v = log_p, log_q
    elif divergence == "reverse_kl":
        log_w, log_v = log_q, log_p
    else:
        return torch.zeros(student.shape[:-1], dtype=torch.bool)
    largest = torch.where(log_v == -INF, log_w, -INF).amax(-1)
    tiny = math.log(16 * torch.finfo(torch.float32).tiny)
    return (largest < tiny).reshape(student.shape[:-1]).cpu()


def _close_or_within_eager(actual, ref, eager, *, rtol, atol, factor, what):
    """float32 tolerance; failing that (an ill-conditioned case where float32 itself is the
    limit), at most ``factor`` x the error of eager PyTorch in the same dtypes (STYLE.md)."""
    try:
        assert_close_fp32(actual, ref, rtol, atol, what)
    except AssertionError:
        if eager is None or not torch.isfinite(eager).all():
            raise
        assert_within_eager_error(actual, ref, eager, factor, what)


def check_rows(student, teacher, labels=None, *, temperature, divergence, beta, alpha=0.0,
               softcap=None, what="", eager_fallback=False):
    """Per-row loss (no-grad path and gradient path) and both gradients against the float64
    reference: +inf where the reference is +inf, finite and close everywhere else.

    ``eager_fallback``: for ill-conditioned rows, an error of at most 2x (loss) / 3x
    (gradients) eager PyTorch's passes too."""
    opts = dict(temperature=temperature, alpha=alpha, divergence=divergence, beta=beta,
                reduction="none", softcap=softcap)
    go = torch.rand(student.shape[:-1], device=student.device) + 0.5
    with torch.no_grad():
        rows_nograd = kdfast.kd_loss(student, teacher, labels, **opts)
    rows, gs, gt = kernel_loss_and_grads(student, teacher, labels, grad_output=go,
                                         teacher_grad=True, **opts)
    ref, ref_gs, ref_gt = ref_loss_and_grads(student, teacher, labels, grad_output=go.double(),
                                             teacher_grad=True, **opts)
    e_rows = e_gs = e_gt = None
    if eager_fallback:
        e_rows, e_gs, e_gt = eager_loss_and_grads(student, teacher, labels, grad_output=go,
                                                  teacher_grad=True, **opts)
    ref = ref.to(rows.device)
    finite = torch.isfinite(ref)
    # +inf because a probability below float32's normal range meets a zero: float32 may
    # round that probability to 0 and drop the term, so a finite loss is accepted too.
    either = torch.zeros_like(finite)
    if not finite.all():
        either = ~finite & _infinite_only_through_tiny_mass(
            soft_cap(student.double(), softcap), soft_cap(teacher.double(), softcap),
            temperature, divergence).to(rows.device)
    rtol, atol = fp32_tolerances(temperature)
    for name, r in (("loss (no grad)", rows_nograd), ("loss (with grad)", rows)):
        must_be_inf = ~finite & ~either
        assert torch.all(r[must_be_inf] == INF), f"{what} {name}: {r} (reference {ref})"
        assert torch.all(r[either] >= 0), f"{what} {name}: {r} (reference {ref})"
        assert torch.isfinite(r[finite]).all(), f"{what} {name}: {r} (reference {ref})"
        _close_or_within_eager(r[finite], ref[finite],
                               None if e_rows is None else e_rows[finite],
                               rtol=rtol, atol=atol, factor=2.0, what=f"{what} {name}")
    for name, g, ref_g, e_g in (("grad_student", gs, ref_gs, e_gs),
                                ("grad_teacher", gt, ref_gt, e_gt)):
        g, ref_g = g[finite], ref_g.to(g.device)[finite]
        assert torch.isfinite(g).all(), f"{what} {name}: {g}"
        scale = float(ref_g.abs().max()) if ref_g.numel() else 0.0
        # float32 math, then one rounding to the gradient's dtype
        g_rtol = max(1e-4, torch.finfo(g.dtype).eps)
        _close_or_within_eager(g, ref_g, None if e_g is None else e_g[finite], rtol=g_rtol,
                               atol=1e-5 * max(scale, 1e-2), factor=3.0, what=f"{what} {name}")
    return rows, gs, gt


# ----------------------------------------------------------------------------- underflowing tails

# (student row, teacher row, temperature): tail probabilities at the edge of float32's
# normal range (e^-87 ~ 1.6e-38, e^-95 ~ 5.5e-42: denormal, 0 when flushed).
TAIL_ROWS = {
    "s0,-95_t0,-87_T1": ([0.0, -95.0], [0.0, -87.0], 1.0),
    "s0,-48_t0,-43.6_T0.5": ([0.0, -48.0], [0.0, -43.6], 0.5),
    "s0,-inf_t0,-87_T1": ([0.0, -INF], [0.0, -87.0], 1.0),
    # the same with student and teacher swapped
    "s0,-87_t0,-95_T1": ([0.0, -87.0], [0.0, -95.0], 1.0),
    "s0,-43.6_t0,-48_T0.5": ([0.0, -43.6], [0.0, -48.0], 0.5),
    "s0,-87_t0,-inf_T1": ([0.0, -87.0], [0.0, -INF], 1.0),
    # both tails denormal, and tails that only the mixture's weights push below the range
    "s0,-100,-101_t0,-99,-103_T1": ([0.0, -100.0, -101.0], [0.0, -99.0, -103.0], 1.0),
    "s0,-86,-88_t0,-88,-86_T1": ([0.0, -86.0, -88.0], [0.0, -88.0, -86.0], 1.0),
    "s0,-44_t0,-46_T0.5": ([0.0, -44.0], [0.0, -46.0], 0.5),
}


def _layouts(s_row, t_row, device):
    """(name, student, teacher, labels): the row alone, padded to V=37 with -1e4 or -inf in
    both, and inside a batch of ordinary rows (with labels, alpha > 0)."""
    s_row = torch.tensor(s_row, dtype=torch.float32, device=device)
    t_row = torch.tensor(t_row, dtype=torch.float32, device=device)
    k = s_row.numel()
    out = [("alone", s_row[None], t_row[None], None)]
    for fill in (-1e4, -INF):
        s = torch.full((1, 37), fill, device=device)
        t = torch.full((1, 37), fill, device=device)
        s[0, 5:5 + k], t[0, 5:5 + k] = s_row, t_row
        out.append((f"padded{fill:g}", s, t, None))
    s, t = logits((5, 37), device=device), logits((5, 37), device=device)
    s[1], t[1] = -1e4, -1e4
    s[1, 30:30 + k], t[1, 30:30 + k] = s_row, t_row
    s[3], t[3] = -INF, -INF
    s[3, 0:k], t[3, 0:k] = s_row, t_row
    labels = torch.tensor([2, 31, -100, 0, 36], device=device)  # row 1: the tail entry
    out.append(("batch", s, t, labels))
    return out


@pytest.mark.parametrize("divergence, beta", SETTINGS)
@pytest.mark.parametrize("case", list(TAIL_ROWS))
def test_underflowing_tails(device, flush_denormal, case, divergence, beta):
    s_row, t_row, temperature = TAIL_ROWS[case]
    for name, s, t, labels in _layouts(s_row, t_row, device):
        alpha = 0.3 if labels is not None else 0.0
        check_rows(s, t, labels, temperature=temperature, divergence=divergence, beta=beta,
                   alpha=alpha, what=f"{case} {name}")


@pytest.mark.parametrize("beta", (1e-4, 0.9999), ids=("beta1e-4", "beta0.9999"))
@pytest.mark.parametrize("case", list(TAIL_ROWS)[:3] + ["s0,-86,-88_t0,-88,-86_T1"])
def test_underflowing_tails_jsd_extreme_beta(device, flush_denormal, case, beta):
    """A mixture weight of 1e-4 pushes beta * p (or (1 - beta) * q) further below the range."""
    s_row, t_row, temperature = TAIL_ROWS[case]
    for name, s, t, labels in _layouts(s_row, t_row, device):
        alpha = 0.3 if labels is not None else 0.0
        check_rows(s, t, labels, temperature=temperature, divergence="jsd", beta=beta,
                   alpha=alpha, what=f"{case} {name}")


@pytest.mark.parametrize("divergence, beta", SETTINGS)
@pytest.mark.parametrize("case", ["s0,-95_t0,-87_T1", "s0,-inf_t0,-87_T1"])
def test_underflowing_tails_mixed_dtypes(device, flush_denormal, case, divergence, beta):
    """The same rows in float16 / bfloat16 (the values are exact in both)."""
    s_row, t_row, temperature = TAIL_ROWS[case]
    for s_dtype, t_dtype in ((torch.bfloat16, torch.bfloat16), (torch.float16, torch.float32),
                             (torch.float32, torch.bfloat16)):
        for name, s, t, labels in _layouts(s_row, t_row, device):
            if s_dtype == torch.float16 or t_dtype == torch.float16:
                # -1e4 is exact in neither; keep what float16 can hold
                s, t = s.clamp(min=-6e4), t.clamp(min=-6e4)
            alpha = 0.3 if labels is not None else 0.0
            check_rows(s.to(s_dtype), t.to(t_dtype), labels, temperature=temperature,
                       divergence=divergence, beta=beta, alpha=alpha,
                       what=f"{case} {name} {s_dtype}/{t_dtype}")


# ----------------------------------------------------------------------------- other extremes


def _extreme(name, device):
    """(student, teacher, temperature) of the held-out extreme cases."""
    if name == "pm1e4_shared_support_T1":
        s, t = logits((4, 61), device=device), logits((4, 61), device=device)
        s[:, ::4] += 1e4
        t[:, ::4] += 1e4
        s[:, 1::4] = -1e4
        t[:, 1::4] = -1e4
        return s, t, 1.0
    if name == "pm1e4_shared_support_T0.05":
        s, t = logits((4, 61), device=device, scale=0.2), logits((4, 61), device=device,
                                                                 scale=0.2)
        s[:, ::4] += 1e4
        t[:, ::4] += 1e4
        s[:, 1::4] -= 1e4
        t[:, 1::4] -= 1e4
        return s, t, 0.05
    if name == "pm1e4_T100":
        s, t = logits((4, 61), device=device), logits((4, 61), device=device)
        s[:, ::3] = 1e4 + s[:, ::3] * 100
        t[:, ::3] = 1e4 + t[:, ::3] * 100
        s[:, 1::3] = -1e4
        t[:, 2::3] = -1e4
        return s, t, 100.0
    if name == "scale3_T100":
        return logits((6, 97), device=device), logits((6, 97), device=device), 100.0
    if name == "scale0.5_T0.05":
        # probabilities spread over e^-1 .. e^-80: many tails denormal in float32
        return (logits((6, 97), device=device, scale=0.5), logits((6, 97), device=device,
                                                                  scale=0.5), 0.05)
    if name == "close_rows_T0.05":
        # teacher a small perturbation of the student: small divergence, denormal tails
        s = logits((6, 97), device=device)
        return s, s + 0.01 * logits((6, 97), device=device, scale=1.0), 0.05
    if name == "teacher_one_hot_by_minus_inf":
        s, t = logits((4, 50), device=device), logits((4, 50), device=device)
        t[:, 1:] = -INF
        return s, t, 1.0
    if name == "student_one_hot_by_minus_inf":
        s, t = logits((4, 50), device=device), logits((4, 50), device=device)
        s[:, :-1] = -INF
        return s, t, 2.0
    if name == "softcap5_pm1e4_T0.05":
        # capped to +-5 and divided by 0.05: logits of +-100, tails far below float32's range
        s, t = logits((4, 61), device=device, scale=3), logits((4, 61), device=device, scale=3)
        s[:, ::3] += 1e4
        t[:, 1::3] -= 1e4
        return s, t, 0.05
    if name == "denormal_both_sides_T1":
        # a dominating entry, the rest at -88 .. -103: p and q both denormal there
        s = -88.0 - 15 * torch.rand(5, 64, device=device)
        t = -88.0 - 15 * torch.rand(5, 64, device=device)
        s[:, 0], t[:, 0] = 0.0, 0.0
        return s, t, 1.0
    raise KeyError(name)


EXTREMES = ("pm1e4_shared_support_T1", "pm1e4_shared_support_T0.05", "pm1e4_T100", "scale3_T100",
            "scale0.5_T0.05", "close_rows_T0.05", "teacher_one_hot_by_minus_inf",
            "student_one_hot_by_minus_inf", "denormal_both_sides_T1", "softcap5_pm1e4_T0.05")


@pytest.mark.parametrize("divergence, beta", SETTINGS)
@pytest.mark.parametrize("case", EXTREMES)
def test_extreme_cases(device, flush_denormal, case, divergence, beta):
    s, t, temperature = _extreme(case, device)
    softcap = 5.0 if case.startswith("softcap5") else None
    check_rows(s, t, temperature=temperature, divergence=divergence, beta=beta, what=case,
               softcap=softcap, eager_fallback=True)


# ----------------------------------------------------------------------------- low precision


@pytest.mark.parametrize("dtypes", [(torch.float16, torch.float16), (torch.bfloat16, torch.bfloat16),
                                    (torch.float32, torch.bfloat16)],
                         ids=lambda d: f"{d[0]}-{d[1]}".replace("torch.", ""))
@pytest.mark.parametrize("temperature", (0.5, 4.0), ids=lambda t: f"T{t:g}")
@pytest.mark.parametrize("divergence, beta", SETTINGS)
def test_low_precision_large_range(device, flush_denormal, dtypes, temperature, divergence, beta):
    """float16 / bfloat16 logits spread over hundreds (every probability but a few is
    denormal or zero in float32): the kernel's error against float64 is at most 2x (loss)
    and 3x (gradients) eager PyTorch's in the same dtypes."""
    s = logits((8, 203), device=device, scale=100.0)
    t = s + logits((8, 203), device=device, scale=20.0)  # related rows: finite divergences
    s[0, :50] = -1e4  # large negative blocks, one per side (the row loss still fits float16)
    t[1, 100:] = -1e4
    labels = torch.tensor([1, 2, -100, 4, 5, -100, 7, 8], device=device)
    loss, gs, gt = check_against_reference(
        s.to(dtypes[0]), t.to(dtypes[1]), labels, teacher_grad=True, eager_rule=True,
        temperature=temperature, alpha=0.3, divergence=divergence, beta=beta, reduction="none",
        grad_output=torch.rand(8, device=device) + 0.5)
    assert torch.isfinite(loss).all()
    assert torch.isfinite(gs).all() and torch.isfinite(gt).all()
