"""Relational losses (rkd_loss, pkt_loss, sp_loss and their modules) against independent
float64 references written as explicit loops over pairs and triplets, hand-checked small
cases, gradcheck, degenerate batches, low-precision dtypes, bad arguments and
torch.compile(fullgraph=True)."""

from __future__ import annotations

import math

import pytest
import torch

import kdfast

CUDA = pytest.param("cuda", id="cuda", marks=[
    pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")])
DEVICES = [pytest.param("cpu", id="cpu"), CUDA]


# ----------------------------------------------------------------------------- references
# Written from the papers' formulas, one pair / triplet at a time, in float64. Coincident
# points follow the documented convention (distance 0, direction the zero vector), decided
# with Python branches so autograd sees constants there.

def _smooth_l1(z: torch.Tensor) -> torch.Tensor:
    a = z.abs()
    return 0.5 * z * z if float(a.detach()) < 1.0 else a - 0.5


def _dist(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    sq = ((a - b) ** 2).sum()
    return sq.sqrt() if float(sq.detach()) > 0 else sq * 0


def _cos_at(xi: torch.Tensor, xj: torch.Tensor, xk: torch.Tensor) -> torch.Tensor:
    u, v = xi - xj, xk - xj
    nu, nv = _dist(xi, xj), _dist(xk, xj)
    if float(nu.detach()) == 0 or float(nv.detach()) == 0:
        return (u * v).sum() * 0
    return (u * v).sum() / (nu * nv)


def ref_rkd(s: torch.Tensor, t: torch.Tensor, distance_weight: float = 25.0,
            angle_weight: float = 50.0) -> torch.Tensor:
    dw, aw = distance_weight, angle_weight
    s, t = s.flatten(1).double(), t.flatten(1).double()
    n = s.shape[0]
    pairs = [(i, j) for i in range(n) for j in range(i + 1, n)]
    loss = s.sum() * 0 + t.sum() * 0
    if pairs and dw:
        ds = [_dist(s[i], s[j]) for i, j in pairs]
        dt = [_dist(t[i], t[j]) for i, j in pairs]
        mu_s, mu_t = sum(ds) / len(pairs), sum(dt) / len(pairs)
        terms = []
        for a, b in zip(ds, dt):
            pa = a / mu_s if float(mu_s.detach()) > 0 else a * 0
            pb = b / mu_t if float(mu_t.detach()) > 0 else b * 0
            terms.append(_smooth_l1(pa - pb))
        loss = loss + dw * sum(terms) / len(terms)
    # unordered {i, k} around each anchor j: the same mean as over ordered triplets
    triplets = [(i, j, k) for j in range(n) for i in range(n) for k in range(i + 1, n)
                if j not in (i, k)]
    if triplets and aw:
        terms = [_smooth_l1(_cos_at(s[i], s[j], s[k]) - _cos_at(t[i], t[j], t[k]))
                 for i, j, k in triplets]
        loss = loss + aw * sum(terms) / len(terms)
    return loss


def ref_pkt(s: torch.Tensor, t: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    def conditional(x):
        n = x.shape[0]
        norms = [x[i].norm() for i in range(n)]
        u = [x[i] / (norms[i] if float(norms[i].detach()) > eps else eps) for i in range(n)]
        k = [[(1 + (u[i] * u[j]).sum()) / 2 for j in range(n)] for i in range(n)]
        p = {}
        for i in range(n):
            total = sum(k[i][j] for j in range(n) if j != i)
            for j in range(n):
                if j != i:
                    p[i, j] = k[i][j] / total
        return p

    s, t = s.flatten(1).double(), t.flatten(1).double()
    n = s.shape[0]
    if n < 2:
        return s.sum() * 0 + t.sum() * 0
    ps, pt = conditional(s), conditional(t)
    kl = sum(pt[key] * torch.log((pt[key] + eps) / (ps[key] + eps)) for key in pt)
    return kl / n


def ref_sp_pair(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    def rows(x):
        b = x.shape[0]
        out = []
        for i in range(b):
            g = torch.stack([(x[i] * x[j]).sum() for j in range(b)])
            out.append(g / g.norm())
        return out

    s, t = s.flatten(1).double(), t.flatten(1).double()
    b = s.shape[0]
    return sum(((gs - gt) ** 2).sum() for gs, gt in zip(rows(s), rows(t))) / b**2


def _leaf(x: torch.Tensor, dtype=torch.float64) -> torch.Tensor:
    return x.detach().to(dtype).requires_grad_(True)


def _check_against_ref(fn, ref, s, t, rtol=1e-10, atol=1e-12, **kw):
    """Loss and both gradients of ``fn`` against ``ref``, float64, grad_output != 1."""
    s1, t1 = _leaf(s), _leaf(t)
    s2, t2 = _leaf(s), _leaf(t)
    out = fn(s1, t1, **kw)
    expected = ref(s2, t2, **kw)
    assert out.dtype == torch.float64 and out.dim() == 0
    torch.testing.assert_close(out, expected.reshape(()), rtol=rtol, atol=atol)
    (out * 1.7).backward()
    (expected * 1.7).backward()
    torch.testing.assert_close(s1.grad, s2.grad, rtol=rtol * 10, atol=atol * 10)
    torch.testing.assert_close(t1.grad, t2.grad, rtol=rtol * 10, atol=atol * 10)
    return out


# ----------------------------------------------------------------------------- rkd_loss

@pytest.mark.parametrize("n", [2, 3, 4, 7])
@pytest.mark.parametrize("weights", [(25.0, 50.0), (1.0, 0.0), (0.0, 2.0)], ids=str)
def test_rkd_matches_loop_reference(n, weights):
    dw, aw = weights
    s, t = torch.randn(n, 5), torch.randn(n, 3) * 4   # widths and scales differ
    _check_against_ref(kdfast.rkd_loss, ref_rkd, s, t, distance_weight=dw, angle_weight=aw)


def test_rkd_hand_checked():
    """Collinear student 0, 1, 2 against an equilateral teacher of side 1.

    Distances: student (1, 2, 1) / mean 4/3 -> (3/4, 3/2, 3/4); teacher all 1. Smooth-L1 of
    (-1/4, 1/2, -1/4) = (1/32, 1/8, 1/32), mean 1/16. Angles: student cosines 1 (at 0),
    -1 (at 1), 1 (at 2); teacher 1/2 everywhere; smooth-L1 of (1/2, -3/2, 1/2) = (1/8, 1, 1/8),
    mean 5/12. Loss = 25/16 + 50 * 5/12 = 1075/48.
    """
    s = torch.tensor([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [2.0, 0.0, 0.0]])
    t = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.5, math.sqrt(3) / 2]])
    torch.testing.assert_close(kdfast.rkd_loss(s, t, angle_weight=0.0, distance_weight=1.0),
                               torch.tensor(1 / 16))
    torch.testing.assert_close(kdfast.rkd_loss(s, t, distance_weight=0.0, angle_weight=1.0),
                               torch.tensor(5 / 12))
    torch.testing.assert_close(kdfast.rkd_loss(s, t), torch.tensor(1075 / 48))
    torch.testing.assert_close(kdfast.RKDLoss()(s.double(), t.double()),
                               torch.tensor(1075 / 48, dtype=torch.float64))


def test_rkd_similarity_invariance():
    """Distances normalised by their mean and angles do not change under rotation, uniform
    scaling and translation: a transformed copy of the teacher gives zero loss."""
    t = torch.randn(9, 4, dtype=torch.float64)
    q, _ = torch.linalg.qr(torch.randn(4, 4, dtype=torch.float64))
    s = 3.5 * t @ q + torch.randn(4, dtype=torch.float64)
    assert float(kdfast.rkd_loss(s, t)) < 1e-20


def test_rkd_gradcheck():
    s = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    t = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: kdfast.rkd_loss(a, b), (s, t))
    assert torch.autograd.gradcheck(
        lambda a, b: kdfast.rkd_loss(a, b, distance_weight=0.0, angle_weight=1.0), (s, t))


def test_rkd_coincident_points():
    """Repeated rows: finite loss and gradients equal to the convention's (the reference
    decides coincidence with explicit branches)."""
    s = torch.randn(6, 4, dtype=torch.float64)
    s[3] = s[1]
    s[5] = s[1]
    t = torch.randn(6, 3, dtype=torch.float64)
    t[2] = t[0]
    _check_against_ref(kdfast.rkd_loss, ref_rkd, s, t)
    # every student point the same: psi_D and all cosines are 0, gradients finite
    s_same = torch.ones(5, 3, dtype=torch.float64, requires_grad=True)
    loss = kdfast.rkd_loss(s_same, t[:5])
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(s_same.grad).all()
    torch.testing.assert_close(loss, ref_rkd(s_same.detach(), t[:5]))


@pytest.mark.parametrize("n", [0, 1, 2])
def test_rkd_tiny_batches(n):
    """N < 2: no pairs, N < 3: no triplets; those terms are 0 and gradients are zeros."""
    s = torch.randn(n, 4, requires_grad=True)
    t = torch.randn(n, 2)
    angle_only = kdfast.rkd_loss(s, t, distance_weight=0.0)
    assert angle_only.item() == 0.0
    loss = kdfast.rkd_loss(s, t)
    loss.backward()
    if n == 2:   # one pair: normalised distance 1 on both sides, up to rounding
        assert loss.item() == pytest.approx(0.0, abs=1e-6)
        assert float(s.grad.abs().max()) < 1e-6
    else:
        assert loss.item() == 0.0 and torch.count_nonzero(s.grad) == 0


def test_rkd_flattens_feature_maps():
    s, t = torch.randn(5, 2, 3, 2), torch.randn(5, 7)
    torch.testing.assert_close(kdfast.rkd_loss(s, t), kdfast.rkd_loss(s.reshape(5, 12), t))
    _check_against_ref(kdfast.rkd_loss, ref_rkd, s, t)


# ----------------------------------------------------------------------------- pkt_loss

@pytest.mark.parametrize("n", [2, 3, 6])
def test_pkt_matches_loop_reference(n):
    s, t = torch.randn(n, 5), torch.randn(n, 8)
    _check_against_ref(kdfast.pkt_loss, ref_pkt, s, t)
    _check_against_ref(kdfast.pkt_loss, ref_pkt, s, t, eps=1e-3)


def test_pkt_hand_checked():
    """Student e1, e2, e3: every kernel 1/2, so p = (1/2, 1/2) per row. Teacher e1, e1, e2:
    kernels K01 = 1, K02 = K12 = 1/2, so rows 0 and 1 are (2/3, 1/3), row 2 is (1/2, 1/2).
    Loss = (2 * (2/3 log(4/3) + 1/3 log(2/3)) + 0) / 3."""
    s = torch.eye(3, dtype=torch.float64)
    t = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    expected = 2 * (2 / 3 * math.log(4 / 3) + 1 / 3 * math.log(2 / 3)) / 3
    assert kdfast.pkt_loss(s, t).item() == pytest.approx(expected, abs=1e-6)   # eps shifts
    assert kdfast.pkt_loss(s, t, eps=1e-12).item() == pytest.approx(expected, rel=1e-9)
    assert kdfast.PKTLoss(eps=1e-12)(s, t).item() == pytest.approx(expected, rel=1e-9)


def test_pkt_gradcheck_and_scale_invariance():
    s = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    t = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: kdfast.pkt_loss(a, b), (s, t))
    # per-row cosine kernel: scaling each sample does not change the loss
    scale = torch.rand(5, 1, dtype=torch.float64) + 0.5
    torch.testing.assert_close(kdfast.pkt_loss(s * scale, t), kdfast.pkt_loss(s, t))
    assert float(kdfast.pkt_loss(t, t).detach()) == pytest.approx(0.0, abs=1e-12)


def test_pkt_zero_rows_and_tiny_batches():
    s = torch.randn(5, 4, dtype=torch.float64)
    s[2] = 0
    t = torch.randn(5, 3, dtype=torch.float64)
    t[0] = 0
    _check_against_ref(kdfast.pkt_loss, ref_pkt, s, t)
    for n in (0, 1):
        x = torch.randn(n, 3, requires_grad=True)
        loss = kdfast.pkt_loss(x, torch.randn(n, 2))
        loss.backward()
        assert loss.item() == 0.0 and torch.count_nonzero(x.grad) == 0


# ----------------------------------------------------------------------------- sp_loss

@pytest.mark.parametrize("shapes", [((4, 6), (4, 3)), ((3, 2, 3, 3), (3, 5, 3, 3)),
                                    ((5, 3, 2, 2), (5, 8)), ((1, 4), (1, 2))], ids=str)
def test_sp_matches_loop_reference(shapes):
    s, t = torch.randn(*shapes[0]), torch.randn(*shapes[1])
    _check_against_ref(kdfast.sp_loss, ref_sp_pair, s, t)


def test_sp_hand_checked():
    """Student rows e1, e2: G = I. Teacher rows e1, e1: G rows (1, 1) / sqrt(2).
    ||G_s - G_t||^2 = 2 ((1 - 1/sqrt2)^2 + 1/2) = 4 - 2 sqrt2; / b^2 = 1 - sqrt2 / 2."""
    s = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    t = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    torch.testing.assert_close(kdfast.sp_loss(s, t), torch.tensor(1 - math.sqrt(2) / 2))
    torch.testing.assert_close(kdfast.SPLoss()(s, t), torch.tensor(1 - math.sqrt(2) / 2))


def test_sp_lists_are_summed():
    s = [torch.randn(4, 3, 2, 2, dtype=torch.float64, requires_grad=True),
         torch.randn(4, 5, dtype=torch.float64, requires_grad=True)]
    t = [torch.randn(4, 6, 2, 2, dtype=torch.float64), torch.randn(4, 2, dtype=torch.float64)]
    total = kdfast.sp_loss(s, t)
    expected = ref_sp_pair(s[0], t[0]) + ref_sp_pair(s[1], t[1])
    torch.testing.assert_close(total, expected)
    torch.testing.assert_close(kdfast.sp_loss(tuple(s), tuple(t)), total)
    torch.testing.assert_close(kdfast.SPLoss()(s, t), total)
    assert torch.autograd.gradcheck(lambda a, b: kdfast.sp_loss([a, b], t), tuple(s))


def test_sp_zero_feature_row():
    s = torch.randn(4, 5, dtype=torch.float64)
    s[1] = 0
    t = torch.randn(4, 3, dtype=torch.float64)
    s.requires_grad_(True)
    loss = kdfast.sp_loss(s, t)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(s.grad).all()
    # the zero row of G stays zero: only the teacher's normalised row 1 (norm 1) remains
    # there, and column 1 of every other student row is 0
    g_t = t @ t.t()
    g_t = g_t / g_t.norm(dim=1, keepdim=True)
    g_s = s.detach() @ s.detach().t()
    norms = g_s.norm(dim=1, keepdim=True)
    g_s = torch.where(norms > 0, g_s / norms.clamp_min(1e-300), 0)
    torch.testing.assert_close(loss.detach(), ((g_s - g_t) ** 2).sum() / 16)


# ----------------------------------------------------------------------------- all three

FUNCS = {
    "rkd": (kdfast.rkd_loss, ref_rkd),
    "pkt": (kdfast.pkt_loss, ref_pkt),
    "sp": (kdfast.sp_loss, ref_sp_pair),
}
NAMES = {"rkd": ("student_emb", "teacher_emb"), "pkt": ("student", "teacher"),
         "sp": ("student_feat", "teacher_feat")}


@pytest.mark.parametrize("name", FUNCS)
@pytest.mark.parametrize("dtypes", [(torch.float16, torch.float16), (torch.bfloat16, torch.bfloat16),
                                    (torch.bfloat16, torch.float32), (torch.float32, torch.float16)],
                         ids=lambda d: f"{d[0]}-{d[1]}".replace("torch.", ""))
def test_low_precision_inputs_compute_in_float32(name, dtypes):
    """float16 / bfloat16 inputs: float32 math and result; close to the float64 reference on
    the same (rounded) inputs; gradients in the inputs' dtypes."""
    fn, ref = FUNCS[name]
    s = torch.randn(6, 8).to(dtypes[0]).requires_grad_(True)
    t = torch.randn(6, 5).to(dtypes[1]).requires_grad_(True)
    out = fn(s, t)
    assert out.dtype == torch.float32
    s64, t64 = _leaf(s), _leaf(t)
    expected = ref(s64, t64)
    torch.testing.assert_close(out.double(), expected, rtol=2e-5, atol=1e-6)
    out.backward()
    expected.backward()
    assert s.grad.dtype == dtypes[0] and t.grad.dtype == dtypes[1]
    for got, want in ((s.grad, s64.grad), (t.grad, t64.grad)):
        scale = float(want.abs().max())
        torch.testing.assert_close(got.double(), want, rtol=1e-2, atol=1e-2 * scale)


@pytest.mark.parametrize("name", FUNCS)
def test_float32_close_to_float64(name):
    fn, ref = FUNCS[name]
    s, t = torch.randn(7, 9), torch.randn(7, 4)
    torch.testing.assert_close(fn(s, t).double(), ref(s, t), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", FUNCS)
def test_teacher_gradient_only_when_it_requires_grad(name):
    fn, _ = FUNCS[name]
    s = torch.randn(5, 4, requires_grad=True)
    t = torch.randn(5, 3, requires_grad=True)
    fn(s, t).backward()
    assert s.grad is not None and t.grad is not None and t.grad.abs().sum() > 0
    s.grad = None
    t_frozen = t.detach()
    fn(s, t_frozen).backward()
    assert s.grad is not None and t_frozen.grad is None


@pytest.mark.parametrize("name", FUNCS)
def test_non_contiguous_inputs(name):
    fn, _ = FUNCS[name]
    s = torch.randn(8, 6).t()[:5]        # [5, 8] with strides (1, 6)
    t = torch.randn(5, 3, 4)[:, :, ::2]  # [5, 3, 2] sliced
    torch.testing.assert_close(fn(s, t), fn(s.contiguous(), t.contiguous()))


@pytest.mark.parametrize("name", FUNCS)
def test_bad_arguments_name_the_argument(name):
    fn, _ = FUNCS[name]
    s_name, t_name = NAMES[name]
    fname = fn.__name__
    good = torch.randn(4, 3)
    with pytest.raises(TypeError, match=f"{fname}: {s_name} must be a floating-point"):
        fn(torch.ones(4, 3, dtype=torch.int64), good)
    with pytest.raises(TypeError, match=f"{fname}: {t_name} must be a floating-point"):
        fn(good, torch.ones(4, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match=f"{fname}: {s_name} must have shape \\[N, D\\]"):
        fn(torch.randn(4), good)
    with pytest.raises(ValueError, match=f"{fname}: {s_name} and {t_name} must have the same "
                                         "batch size N"):
        fn(good, torch.randn(5, 3))
    with pytest.raises(TypeError, match=f"{fname}: {t_name} must be a torch.Tensor"
                       if name != "sp" else "sp_loss: student_feat and teacher_feat must both"):
        fn(good, [[1.0, 2.0, 3.0]] * 4)


def test_bad_options():
    s, t = torch.randn(4, 3), torch.randn(4, 2)
    with pytest.raises(ValueError, match="rkd_loss: distance_weight must be finite and >= 0"):
        kdfast.rkd_loss(s, t, distance_weight=-1.0)
    with pytest.raises(ValueError, match="rkd_loss: angle_weight must be finite and >= 0"):
        kdfast.rkd_loss(s, t, angle_weight=float("nan"))
    with pytest.raises(TypeError, match="rkd_loss: angle_weight must be a float"):
        kdfast.rkd_loss(s, t, angle_weight=True)
    with pytest.raises(ValueError, match="both 0"):
        kdfast.RKDLoss(distance_weight=0.0, angle_weight=0.0)
    with pytest.raises(ValueError, match="pkt_loss: eps must be finite and > 0"):
        kdfast.pkt_loss(s, t, eps=0.0)
    with pytest.raises(ValueError, match="pkt_loss: eps must be finite and > 0"):
        kdfast.PKTLoss(eps=-1e-7)
    with pytest.raises(ValueError, match="sp_loss: student_feat and teacher_feat must hold the "
                                         "same number"):
        kdfast.sp_loss([s, s], [t])
    with pytest.raises(ValueError, match="sp_loss: student_feat and teacher_feat are empty"):
        kdfast.sp_loss([], [])
    with pytest.raises(ValueError, match=r"sp_loss: student_feat\[1\] and teacher_feat\[1\] must "
                                         "have the same batch size N"):
        kdfast.sp_loss([s, s], [t, torch.randn(3, 2)])
    with pytest.raises(TypeError, match="sp_loss: student_feat must be a tensor or a list"):
        kdfast.sp_loss({"a": s}, {"a": t})


def test_modules_match_functions_and_repr():
    s, t = torch.randn(6, 5), torch.randn(6, 3)
    crit = kdfast.RKDLoss(distance_weight=2.0, angle_weight=3.0)
    assert torch.equal(crit(s, t), kdfast.rkd_loss(s, t, distance_weight=2.0, angle_weight=3.0))
    assert "distance_weight=2.0, angle_weight=3.0" in repr(crit)
    assert torch.equal(kdfast.PKTLoss(eps=1e-5)(s, t), kdfast.pkt_loss(s, t, eps=1e-5))
    assert "eps=1e-05" in repr(kdfast.PKTLoss(eps=1e-5))
    assert torch.equal(kdfast.SPLoss()(s, t), kdfast.sp_loss(s, t))
    for m in (crit, kdfast.PKTLoss(), kdfast.SPLoss()):
        assert list(m.parameters()) == [] and m.state_dict() == {}


@pytest.mark.parametrize("name", ["rkd", "rkd_angle_only", "pkt", "sp", "sp_list"])
def test_compile_fullgraph(name, fresh_dynamo):
    s = torch.randn(6, 5, requires_grad=True)
    t = torch.randn(6, 3, 2)
    fns = {
        "rkd": lambda a, b: kdfast.rkd_loss(a, b),
        "rkd_angle_only": lambda a, b: kdfast.rkd_loss(a, b, distance_weight=0.0),
        "pkt": lambda a, b: kdfast.pkt_loss(a, b),
        "sp": lambda a, b: kdfast.sp_loss(a, b),
        "sp_list": lambda a, b: kdfast.sp_loss([a, a * 2], [b, b[:, :, 0]]),
    }
    fn = fns[name]
    s_c = s.detach().clone().requires_grad_(True)
    compiled = torch.compile(fn, fullgraph=True)
    out_c = compiled(s_c, t)
    out = fn(s, t)
    torch.testing.assert_close(out_c, out, rtol=1e-5, atol=1e-6)
    (out_c * 0.3).backward()
    (out * 0.3).backward()
    torch.testing.assert_close(s_c.grad, s.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("device", [CUDA])
@pytest.mark.parametrize("name", FUNCS)
def test_cuda_matches_cpu_without_host_sync(name, device):
    """Same loss on the GPU, and no host synchronisation in forward or backward."""
    fn, _ = FUNCS[name]
    s = torch.randn(32, 24, dtype=torch.float64)
    t = torch.randn(32, 16, dtype=torch.float64)
    s_d = s.to(device).requires_grad_(True)
    t_d = t.to(device)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = fn(s_d, t_d)
        out.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    s.requires_grad_(True)
    expected = fn(s, t)
    expected.backward()
    torch.testing.assert_close(out.cpu(), expected)
    torch.testing.assert_close(s_d.grad.cpu(), s.grad)
    # bfloat16 on the GPU: float32 result
    assert fn(s_d.bfloat16(), t_d.half()).dtype == torch.float32
