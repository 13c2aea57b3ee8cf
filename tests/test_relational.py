"""Relational losses (rkd_loss, pkt_loss, sp_loss and their modules) against independent
float64 references written as explicit loops over pairs and triplets, a second independent
formulation written the way the widely used published implementations compute rkd / pkt
(Gram-matrix pdist, batched matmul of normalised differences, means over the full
matrices), hand-checked small cases, gradcheck, degenerate batches, low-precision dtypes,
bad arguments and torch.compile(fullgraph=True)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

import kdfast

CUDA = pytest.param("cuda", id="cuda", marks=[
    pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")])
DEVICES = [pytest.param("cpu", id="cpu"), CUDA]


# ----------------------------------------------------------------------------- references
# Written from the formulas, one entry at a time, in float64, with the means over ALL
# entries of the relation matrices (degenerate ones included). Clamps and coincident points
# are decided with Python branches, so autograd sees constants there (zero gradients).

def _smooth_l1(z: torch.Tensor) -> torch.Tensor:
    a = z.abs()
    return 0.5 * z * z if float(a.detach()) < 1.0 else a - 0.5


def _rkd_dist(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Off-diagonal RKD distance: sqrt(max(|a - b|^2, 1e-12))."""
    sq = ((a - b) ** 2).sum()
    return sq.sqrt() if float(sq.detach()) > 1e-12 else sq * 0 + math.sqrt(1e-12)


def _unit(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(a - b) / max(|a - b|, 1e-12), the zero vector when a == b."""
    v = a - b
    sq = (v * v).sum()
    if float(sq.detach()) == 0:
        return v * 0
    norm = sq.sqrt()
    return v / norm if float(norm.detach()) > 1e-12 else v / 1e-12


def _cos_at(xi: torch.Tensor, xj: torch.Tensor, xk: torch.Tensor) -> torch.Tensor:
    """Cosine at xj of the triplet (xi, xj, xk); any i, j, k (degenerate ones included)."""
    return (_unit(xi, xj) * _unit(xk, xj)).sum()


def _rkd_potentials(x: torch.Tensor) -> dict:
    n = x.shape[0]
    d = {(i, j): _rkd_dist(x[i], x[j]) if i != j else x.sum() * 0
         for i in range(n) for j in range(n)}
    positive = [v for v in d.values() if float(v.detach()) > 0]
    if not positive:
        return {key: v * 0 for key, v in d.items()}
    mean = sum(positive) / len(positive)
    return {key: v / mean for key, v in d.items()}


def ref_rkd(s: torch.Tensor, t: torch.Tensor, distance_weight: float = 25.0,
            angle_weight: float = 50.0) -> torch.Tensor:
    dw, aw = distance_weight, angle_weight
    s, t = s.flatten(1).double(), t.flatten(1).double()
    n = s.shape[0]
    loss = s.sum() * 0 + t.sum() * 0
    if dw and n:
        ps, pt = _rkd_potentials(s), _rkd_potentials(t)
        loss = loss + dw * sum(_smooth_l1(ps[key] - pt[key]) for key in ps) / n**2
    if aw and n:
        terms = [_smooth_l1(_cos_at(s[i], s[j], s[k]) - _cos_at(t[i], t[j], t[k]))
                 for j, i, k in itertools.product(range(n), repeat=3)]
        loss = loss + aw * sum(terms) / n**3
    return loss


def ref_pkt(s: torch.Tensor, t: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    def conditional(x):
        n = x.shape[0]
        u = []
        for i in range(n):
            sq = (x[i] * x[i]).sum()
            norm = sq.sqrt() if float(sq.detach()) > 0 else sq * 0
            u.append(x[i] / (norm + eps))
        k = [[(1 + (u[i] * u[j]).sum()) / 2 for j in range(n)] for i in range(n)]
        return [[k[i][j] / sum(k[i]) for j in range(n)] for i in range(n)]

    s, t = s.flatten(1).double(), t.flatten(1).double()
    n = s.shape[0]
    if n == 0:
        return s.sum() * 0 + t.sum() * 0
    ps, pt = conditional(s), conditional(t)
    kl = sum(pt[i][j] * torch.log((pt[i][j] + eps) / (ps[i][j] + eps))
             for i in range(n) for j in range(n))
    return kl / n**2


# The same two losses written the way the widely used published implementations compute
# them (vectorised, whole matrices, torch.mean): a second, independent formulation.

def published_rkd(s: torch.Tensor, t: torch.Tensor, distance_weight: float = 25.0,
                  angle_weight: float = 50.0) -> torch.Tensor:
    def pdist(e):
        sq = e.pow(2).sum(dim=1)
        d = (sq.unsqueeze(1) + sq.unsqueeze(0) - 2 * e @ e.t()).clamp(min=1e-12).sqrt()
        d = d.clone()
        d[range(len(e)), range(len(e))] = 0
        return d

    def distance_potentials(e):
        d = pdist(e)
        return d / d[d > 0].mean()

    def angle_potentials(e):
        diff = e.unsqueeze(0) - e.unsqueeze(1)
        unit = F.normalize(diff, p=2, dim=2)
        return torch.bmm(unit, unit.transpose(1, 2)).view(-1)

    s, t = s.flatten(1), t.flatten(1)
    loss_d = F.smooth_l1_loss(distance_potentials(s), distance_potentials(t))
    loss_a = F.smooth_l1_loss(angle_potentials(s), angle_potentials(t))
    return distance_weight * loss_d + angle_weight * loss_a


def published_pkt(s: torch.Tensor, t: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    def similarity(x):
        x = x / (torch.sqrt(torch.sum(x ** 2, dim=1, keepdim=True)) + eps)
        x = torch.where(x != x, torch.zeros_like(x), x)
        k = (torch.mm(x, x.transpose(0, 1)) + 1.0) / 2.0
        return k / torch.sum(k, dim=1, keepdim=True)

    k_s, k_t = similarity(s.flatten(1)), similarity(t.flatten(1))
    return torch.mean(k_t * torch.log((k_t + eps) / (k_s + eps)))


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


@pytest.mark.parametrize("n", [2, 3, 5, 9])
@pytest.mark.parametrize("weights", [(25.0, 50.0), (1.0, 0.0), (0.0, 1.0)], ids=str)
def test_rkd_matches_published_formulation(n, weights):
    """Loss and gradients equal the Gram-matrix / bmm / full-mean formulation (float64),
    and the loss agrees in float32 too."""
    dw, aw = weights
    s, t = torch.randn(n, 6) * 3, torch.randn(n, 4) + 2
    _check_against_ref(kdfast.rkd_loss, published_rkd, s, t, rtol=1e-9, atol=1e-12,
                       distance_weight=dw, angle_weight=aw)
    torch.testing.assert_close(kdfast.rkd_loss(s, t, distance_weight=dw, angle_weight=aw),
                               published_rkd(s, t, dw, aw), rtol=1e-4, atol=1e-6)


def test_rkd_coincident_points_match_published_formulation():
    """Repeated rows: the clamped distance 1e-6 counts as positive in the mean, and the
    i == k angle of a pair that coincides on one side only counts 1/2 in the mean."""
    s = torch.randn(6, 4, dtype=torch.float64)
    s[3] = s[1]
    s[5] = s[1]
    t = torch.randn(6, 3, dtype=torch.float64)
    t[2] = t[0]
    for dw, aw in ((25.0, 50.0), (1.0, 0.0), (0.0, 1.0)):
        torch.testing.assert_close(kdfast.rkd_loss(s, t, distance_weight=dw, angle_weight=aw),
                                   published_rkd(s, t, dw, aw), rtol=1e-9, atol=1e-12)
    # distance-only gradients agree as well (both clamp: zero gradient at the coincidence)
    _check_against_ref(kdfast.rkd_loss, published_rkd, s, t, rtol=1e-9, atol=1e-12,
                       distance_weight=1.0, angle_weight=0.0)


def test_rkd_hand_checked():
    """Collinear student 0, 1, 2 against an equilateral teacher of side 1.

    Distances: student (1, 2, 1), each pair twice in the 3 x 3 matrix, mean of the six
    positive entries 4/3 -> (3/4, 3/2, 3/4); teacher all 1. Smooth-L1 of (-1/4, 1/2, -1/4)
    = (1/32, 1/8, 1/32), twice each: 3/8 over 9 entries, L_D = 1/24. Angles: student
    cosines 1 (at 0), -1 (at 1), 1 (at 2); teacher 1/2 everywhere; smooth-L1 of
    (1/2, -3/2, 1/2) = (1/8, 1, 1/8), twice each (i, k and k, i): 5/2; the 21 degenerate
    entries add 0 (i == k: 1 on both sides; i == j or k == j: 0), so L_A = (5/2) / 27 = 5/54.
    Loss = 25/24 + 50 * 5/54 = 1225/216.
    """
    s = torch.tensor([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [2.0, 0.0, 0.0]])
    t = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.5, math.sqrt(3) / 2]])
    torch.testing.assert_close(kdfast.rkd_loss(s, t, angle_weight=0.0, distance_weight=1.0),
                               torch.tensor(1 / 24))
    torch.testing.assert_close(kdfast.rkd_loss(s, t, distance_weight=0.0, angle_weight=1.0),
                               torch.tensor(5 / 54))
    torch.testing.assert_close(kdfast.rkd_loss(s, t), torch.tensor(1225 / 216))
    torch.testing.assert_close(kdfast.RKDLoss()(s.double(), t.double()),
                               torch.tensor(1225 / 216, dtype=torch.float64))


def test_rkd_hand_checked_one_sided_coincidence():
    """N = 2, student points coincide, teacher points do not. Distances: student 1e-6
    (clamped) off the diagonal, normalised to 1 like the teacher's: L_D = 0. Angles: the
    two i == k entries are |e|^2 = 0 for the student, 1 for the teacher, smooth-L1 1/2
    each, over 8 entries: L_A = 1/8. The student gradient is 0 (no direction to follow)."""
    s = torch.ones(2, 3, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([[0.0, 1.0], [2.0, 0.0]], dtype=torch.float64)
    assert kdfast.rkd_loss(s, t, angle_weight=0.0).item() == 0.0
    loss = kdfast.rkd_loss(s, t, distance_weight=0.0, angle_weight=1.0)
    assert loss.item() == pytest.approx(1 / 8, rel=1e-15)
    loss.backward()
    assert torch.count_nonzero(s.grad) == 0


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
    decides coincidence with explicit branches: zero gradient there)."""
    s = torch.randn(6, 4, dtype=torch.float64)
    s[3] = s[1]
    s[5] = s[1]
    t = torch.randn(6, 3, dtype=torch.float64)
    t[2] = t[0]
    _check_against_ref(kdfast.rkd_loss, ref_rkd, s, t)
    # every student point the same: psi_D is 1 off the diagonal (clamped distances), all
    # cosines 0; gradients 0
    s_same = torch.ones(5, 3, dtype=torch.float64, requires_grad=True)
    loss = kdfast.rkd_loss(s_same, t[:5])
    loss.backward()
    assert torch.isfinite(loss) and torch.count_nonzero(s_same.grad) == 0
    torch.testing.assert_close(loss, ref_rkd(s_same.detach(), t[:5]))
    torch.testing.assert_close(loss, published_rkd(s_same.detach(), t[:5]))


@pytest.mark.parametrize("n", [0, 1, 2])
def test_rkd_tiny_batches(n):
    """N = 0 and N = 1: 0 (where the plain means would be NaN), zero gradients. N = 2 with
    distinct points: both terms 0 up to rounding (normalised distance 1 on both sides; the
    only nonzero angles are the i == k ones, 1 on both sides)."""
    s = torch.randn(n, 4, requires_grad=True)
    t = torch.randn(n, 2)
    angle_only = kdfast.rkd_loss(s, t, distance_weight=0.0)
    loss = kdfast.rkd_loss(s, t)
    loss.backward()
    assert s.grad is not None and s.grad.shape == s.shape
    if n == 2:
        assert angle_only.item() == pytest.approx(0.0, abs=1e-12)
        assert loss.item() == pytest.approx(0.0, abs=1e-6)
        assert float(s.grad.abs().max()) < 1e-6
        torch.testing.assert_close(loss, published_rkd(s.detach(), t), rtol=0, atol=1e-6)
    else:
        assert angle_only.item() == 0.0
        assert loss.item() == 0.0 and torch.count_nonzero(s.grad) == 0
        torch.testing.assert_close(loss.double(), ref_rkd(s.detach(), t))


def test_rkd_flattens_feature_maps():
    s, t = torch.randn(5, 2, 3, 2), torch.randn(5, 7)
    torch.testing.assert_close(kdfast.rkd_loss(s, t), kdfast.rkd_loss(s.reshape(5, 12), t))
    _check_against_ref(kdfast.rkd_loss, ref_rkd, s, t)


# ----------------------------------------------------------------------------- pkt_loss

@pytest.mark.parametrize("n", [1, 2, 3, 6])
def test_pkt_matches_loop_reference(n):
    s, t = torch.randn(n, 5), torch.randn(n, 8)
    _check_against_ref(kdfast.pkt_loss, ref_pkt, s, t)
    _check_against_ref(kdfast.pkt_loss, ref_pkt, s, t, eps=1e-3)


@pytest.mark.parametrize("n", [1, 2, 5, 16])
def test_pkt_matches_published_formulation(n):
    """Loss and gradients equal the full-matrix torch.mean formulation (float64), and the
    loss agrees in float32 too."""
    s, t = torch.randn(n, 7) * 5, torch.randn(n, 3) + 1
    _check_against_ref(kdfast.pkt_loss, published_pkt, s, t, rtol=1e-9, atol=1e-14)
    _check_against_ref(kdfast.pkt_loss, published_pkt, s, t, rtol=1e-9, atol=1e-14, eps=1e-3)
    torch.testing.assert_close(kdfast.pkt_loss(s, t), published_pkt(s, t), rtol=1e-4,
                               atol=1e-7)


def test_pkt_hand_checked():
    """Student e1, e2, e3: K = 1 on the diagonal, 1/2 off it; rows (1/2, 1/4, 1/4) up to
    order. Teacher e1, e1, e2: K rows (1, 1, 1/2), (1, 1, 1/2), (1/2, 1/2, 1), so P rows
    (2/5, 2/5, 1/5) twice and (1/4, 1/4, 1/2), which equals the student's row 2. Rows 0 and
    1 each give 3/5 log(4/5) + 2/5 log(8/5); the mean over the 9 entries is 2/9 of that."""
    s = torch.eye(3, dtype=torch.float64)
    t = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    expected = 2 * (3 / 5 * math.log(4 / 5) + 2 / 5 * math.log(8 / 5)) / 9
    assert kdfast.pkt_loss(s, t).item() == pytest.approx(expected, abs=1e-6)   # eps shifts
    assert kdfast.pkt_loss(s, t, eps=1e-12).item() == pytest.approx(expected, rel=1e-9)
    assert kdfast.PKTLoss(eps=1e-12)(s, t).item() == pytest.approx(expected, rel=1e-9)


def test_pkt_gradcheck_and_scale_invariance():
    s = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    t = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: kdfast.pkt_loss(a, b), (s, t))
    # per-row cosine kernel: scaling each sample barely changes the loss (only through the
    # eps added to the norms)
    scale = torch.rand(5, 1, dtype=torch.float64) + 0.5
    torch.testing.assert_close(kdfast.pkt_loss(s * scale, t), kdfast.pkt_loss(s, t),
                               rtol=1e-5, atol=1e-9)
    assert float(kdfast.pkt_loss(t, t).detach()) == pytest.approx(0.0, abs=1e-12)


def test_pkt_zero_rows_and_tiny_batches():
    s = torch.randn(5, 4, dtype=torch.float64)
    s[2] = 0
    t = torch.randn(5, 3, dtype=torch.float64)
    t[0] = 0
    out = _check_against_ref(kdfast.pkt_loss, ref_pkt, s, t)
    # the published formulation gives the same value (its gradient at a zero row is NaN)
    torch.testing.assert_close(out.detach(), published_pkt(s, t), rtol=1e-9, atol=1e-14)
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
