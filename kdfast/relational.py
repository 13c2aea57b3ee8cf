"""Relational distillation losses: the student matches how the teacher relates the samples
of a batch to each other, not the teacher's features themselves.

- :func:`rkd_loss` / :class:`RKDLoss`: relational KD, distance- and angle-wise (Park et al.,
  CVPR 2019).
- :func:`pkt_loss` / :class:`PKTLoss`: probabilistic knowledge transfer (Passalis & Tefas,
  ECCV 2018).
- :func:`sp_loss` / :class:`SPLoss`: similarity-preserving KD (Tung & Mori, ICCV 2019).

:func:`rkd_loss` and :func:`pkt_loss` follow the conventions of the widely used published
implementations of these losses and give the same numbers: means over the full ``N x N``
(``N x N x N``) relation matrices, degenerate entries included (see their docstrings).

These are plain PyTorch (no custom op): the work is batch-by-batch matrix products that
cuBLAS / MKL already run well, on ``N x N`` (and ``N x N x N`` for angles) relations.
Student and teacher features may have different widths; only the batch size ``N`` must
agree. Math is in float32 (float64 when an input is float64) whatever the input dtype, and
the loss is returned in that dtype. Gradients reach the teacher too when it requires grad:
detach it (or compute it under ``torch.no_grad()``) for the usual frozen teacher. The
functions do no host synchronisation, so they run inside CUDA graphs and
``torch.compile(fullgraph=True)``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from kdfast._args import FLOAT_DTYPES

__all__ = ["PKTLoss", "RKDLoss", "SPLoss", "pkt_loss", "rkd_loss", "sp_loss"]


# ----------------------------------------------------------------------------- helpers

def _check_batch_pair(fn: str, s_name: str, student: object, t_name: str,
                      teacher: object) -> None:
    """Raises for anything but two floating tensors ``[N, ...]`` (at least 2-D) with the
    same ``N`` on the same device."""
    for name, x in ((s_name, student), (t_name, teacher)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{fn}: {name} must be a floating-point tensor (float32, float16, "
                            f"bfloat16 or float64), got {x.dtype}")
        if x.dim() < 2:
            raise ValueError(f"{fn}: {name} must have shape [N, D] (or [N, ...], flattened to "
                             f"[N, D]), got shape {tuple(x.shape)}")
    assert isinstance(student, torch.Tensor) and isinstance(teacher, torch.Tensor)
    if student.shape[0] != teacher.shape[0]:
        raise ValueError(f"{fn}: {s_name} and {t_name} must have the same batch size N (dim 0), "
                         f"got {student.shape[0]} and {teacher.shape[0]}")
    if student.device != teacher.device:
        raise ValueError(f"{fn}: {s_name} and {t_name} must be on the same device, got "
                         f"{student.device} and {teacher.device}")


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float64 when an input is float64, float32 otherwise (float16 / bfloat16 included)."""
    return torch.float64 if any(x.dtype == torch.float64 for x in tensors) else torch.float32


def _rows(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``[N, ...]`` -> ``[N, D]`` in the compute dtype."""
    return x.flatten(1).to(dtype)


def _safe_reciprocal(x: torch.Tensor, floor: float = 0.0) -> torch.Tensor:
    """``1 / max(x, floor)`` where ``x > 0``, 0 elsewhere, with finite gradients at 0 (the
    inner ``where`` keeps ``1 / 0`` out of the graph, so no ``0 * inf`` in the backward)."""
    positive = x > 0
    safe = torch.where(positive, x, torch.ones_like(x))
    if floor > 0:
        safe = safe.clamp_min(floor)
    return torch.where(positive, 1.0 / safe, torch.zeros_like(x))


def _normalize_rows(x: torch.Tensor, eps: float = 0.0) -> torch.Tensor:
    """``x / max(||x||, eps)`` along the last dim. An exactly-zero vector stays zero with a
    zero gradient (the subgradient at the kink, rather than the ``1 / eps``-scaled derivative
    of the clamped formula, which would blow up the gradient of coincident points)."""
    norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
    return x * _safe_reciprocal(norm, eps)


def _check_weight(fn: str, name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{fn}: {name} must be a float, got {type(value).__name__}")
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"{fn}: {name} must be finite and >= 0, got {value}")
    return float(value)


def _check_rkd_weights(distance_weight: object, angle_weight: object) -> tuple[float, float]:
    dw = _check_weight("rkd_loss", "distance_weight", distance_weight)
    aw = _check_weight("rkd_loss", "angle_weight", angle_weight)
    if dw == 0 and aw == 0:
        raise ValueError("rkd_loss: distance_weight and angle_weight are both 0; at least one "
                         "must be > 0")
    return dw, aw


def _check_eps(fn: str, eps: object) -> float:
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        raise TypeError(f"{fn}: eps must be a float, got {type(eps).__name__}")
    if not (math.isfinite(eps) and eps > 0):
        raise ValueError(f"{fn}: eps must be finite and > 0, got {eps}")
    return float(eps)


# ----------------------------------------------------------------------------- RKD

_RKD_SQ_DIST_FLOOR = 1e-12   # off-diagonal squared distances are clamped here before the sqrt
_RKD_NORM_EPS = 1e-12        # norm floor of the normalised differences (angle term)


def _rkd_distances(diff: torch.Tensor) -> torch.Tensor:
    """Distance potentials ``[N, N]`` from the pairwise differences ``diff`` ``[N, N, D]``.

    ``D[j, i] = sqrt(max(|x_i - x_j|^2, 1e-12))`` off the diagonal, exactly 0 on it, divided
    by the mean of its strictly positive entries (every off-diagonal one, as the clamp keeps
    them >= 1e-6; none for ``N < 2``, where the potentials are all 0). The squared distances
    come from the exact differences, not from ``|x_i|^2 + |x_j|^2 - 2 x_i.x_j``, which cancels
    catastrophically for close points; where both agree (distances well above rounding) the
    numbers are the same. Below the clamp the gradient is 0 (no ``sqrt`` at 0 in the graph).
    """
    n = diff.shape[0]
    off_diagonal = ~torch.eye(n, dtype=torch.bool, device=diff.device)
    sq = diff.square().sum(dim=-1).clamp_min(_RKD_SQ_DIST_FLOOR)
    dist = torch.where(off_diagonal, sq.sqrt(), torch.zeros_like(sq))
    positive = dist > 0
    # mean over the positive entries as device tensors (no data-dependent shape, no sync);
    # the non-positive entries are exactly 0, so the full sum is the sum of the positive ones
    mean = dist.sum() / positive.sum().clamp_min(1).to(dist.dtype)
    return dist * _safe_reciprocal(mean)


def _rkd_angles(diff: torch.Tensor) -> torch.Tensor:
    """Angle potentials ``[N, N, N]``: ``cos[j, i, k] = <e_ji, e_jk>`` with
    ``e_ji = (x_i - x_j) / max(|x_i - x_j|, 1e-12)`` (``diff[j, i] = x_i - x_j``), one batched
    Gram matrix of the normalised differences around each anchor ``j`` (never an
    ``N x N x N x D`` tensor). A zero difference (``i == j``, or coincident points) gives the
    zero vector, hence cosine 0, with a zero gradient."""
    unit = _normalize_rows(diff, _RKD_NORM_EPS)
    return torch.bmm(unit, unit.transpose(1, 2))


def rkd_loss(student_emb: torch.Tensor, teacher_emb: torch.Tensor, *,
             distance_weight: float = 25.0, angle_weight: float = 50.0) -> torch.Tensor:
    r"""Relational knowledge distillation (Park et al., "Relational Knowledge Distillation",
    CVPR 2019): the student matches the teacher's pairwise distances and triplet angles.

    With ``x`` the rows of one side (``N`` samples; the same for the student and the teacher),
    the distance potentials are the ``[N, N]`` matrix::

        D_ij  = sqrt(max(|x_i - x_j|^2, 1e-12))   for i != j,      D_ii = 0
        psi_D = D / mean(D_ij over the entries with D_ij > 0)
        L_D   = 1/N^2 * sum over ALL i, j of smooth_l1(psi_D^s(i, j) - psi_D^t(i, j))

    and the angle potentials the ``[N, N, N]`` tensor of cosines at ``j``::

        e_ji  = (x_i - x_j) / max(|x_i - x_j|, 1e-12)             (0 when x_i == x_j)
        psi_A(j, i, k) = <e_ji, e_jk>
        L_A   = 1/N^3 * sum over ALL j, i, k of smooth_l1(psi_A^s(j, i, k) - psi_A^t(j, i, k))

    ``smooth_l1`` is the Huber loss with ``beta = 1`` (``0.5 z^2`` for ``|z| < 1``, else
    ``|z| - 0.5``), and the loss is ``distance_weight * L_D + angle_weight * L_A`` (the
    defaults 25 and 50 are the paper's). These are the conventions of the widely used
    published implementations, and the numbers are the same: the means run over the full
    matrices, degenerate entries included. The diagonal ``D_ii`` (0 on both sides) and the
    angles with ``i == j`` or ``k == j`` (0 on both sides) add 0 but count in the means;
    ``psi_A(j, i, i) = |e_ji|^2`` is 1 (0 for a coincident pair), so it adds 0 unless ``x_i``
    and ``x_j`` coincide on exactly one side.

    Conventions:

    - Small batches give sensible values where the plain formulas would divide by zero
      (an empty mean is NaN): ``N = 0`` gives 0, and so does ``N = 1`` (no positive
      distance, so ``psi_D = 0``; the single angle entry is 0 on both sides). ``N = 2`` has
      ``psi_D = 1`` off the diagonal on both sides, and its only nonzero angles are the
      ``i == k`` ones (1 on both sides for distinct points), so with distinct points ``L_D``
      and ``L_A`` are 0 up to rounding: RKD needs ``N >= 3`` to teach anything. The loss
      stays part of the graph (zero gradients where it is constant).
    - Coincident points (``x_i == x_j``, e.g. repeated samples or dead embeddings): their
      distance is clamped to ``1e-6`` (it still counts as positive in the mean) and their
      difference normalises to the zero vector, so every angle with that pair as a leg is 0.
      The gradient there is 0, never NaN: the clamp stops it for the distances, and the
      exactly-zero difference gets the zero subgradient for the angles (the literal
      ``v / max(|v|, 1e-12)`` would have a ``1e12``-scaled derivative there).
    - The teacher is not detached: gradients reach ``teacher_emb`` when it requires grad.
      Detach it (or run the teacher under ``torch.no_grad()``) for a frozen teacher.

    Cost: the pairwise differences ``[N, N, D]`` per side (exact, not from a Gram matrix),
    the distances ``[N, N]`` and the cosines ``[N, N, N]`` as one batched matmul of the
    normalised differences (``O(N^3 D)`` flops, ``O(N^2 D + N^3)`` memory per side, plus the
    ``[N, N, N]`` smooth-L1 terms; never ``N^3 x D``). With ``angle_weight=0`` only
    ``O(N^2 D)``.

    Args:
        student_emb: ``[N, Ds]`` (or ``[N, ...]``, flattened), float32 / float16 / bfloat16
            / float64.
        teacher_emb: ``[N, Dt]`` (or ``[N, ...]``); ``Dt`` may differ from ``Ds``, dtype too.
        distance_weight: weight of ``L_D``, >= 0 (0 skips the term).
        angle_weight: weight of ``L_A``, >= 0 (0 skips the term and its ``N^3`` work).

    Returns:
        0-dim float32 tensor (float64 if an input is float64).

    Example::

        >>> import torch, kdfast
        >>> student = torch.randn(64, 128, requires_grad=True)   # student embeddings
        >>> teacher = torch.randn(64, 512)                       # teacher embeddings
        >>> loss = kdfast.rkd_loss(student, teacher)               # 25 * L_D + 50 * L_A
        >>> loss.backward()
    """
    dw, aw = _check_rkd_weights(distance_weight, angle_weight)
    _check_batch_pair("rkd_loss", "student_emb", student_emb, "teacher_emb", teacher_emb)
    dtype = _compute_dtype(student_emb, teacher_emb)
    n = student_emb.shape[0]
    x_s, x_t = _rows(student_emb, dtype), _rows(teacher_emb, dtype)
    diff_s = x_s.unsqueeze(0) - x_s.unsqueeze(1)            # [N(j), N(i), D]: x_i - x_j
    diff_t = x_t.unsqueeze(0) - x_t.unsqueeze(1)
    terms = []
    if dw > 0:
        # means over all N^2 / N^3 entries, as sums over max(count, 1): N = 0 gives 0, not NaN
        pair_sum = F.smooth_l1_loss(_rkd_distances(diff_s), _rkd_distances(diff_t),
                                    reduction="sum", beta=1.0)
        terms.append(dw * (pair_sum / max(n * n, 1)))
    if aw > 0:
        triplet_sum = F.smooth_l1_loss(_rkd_angles(diff_s), _rkd_angles(diff_t),
                                       reduction="sum", beta=1.0)
        terms.append(aw * (triplet_sum / max(n * n * n, 1)))
    return terms[0] if len(terms) == 1 else terms[0] + terms[1]


class RKDLoss(nn.Module):
    """Module form of :func:`kdfast.rkd_loss` (relational KD, Park et al., CVPR 2019).

    Shapes: ``student_emb`` ``[N, Ds]``, ``teacher_emb`` ``[N, Dt]`` (or ``[N, ...]``).

    Example::

        >>> crit = kdfast.RKDLoss(distance_weight=25.0, angle_weight=50.0)
        >>> loss = crit(student_emb, teacher_emb.detach())
    """

    def __init__(self, distance_weight: float = 25.0, angle_weight: float = 50.0) -> None:
        super().__init__()
        self.distance_weight, self.angle_weight = _check_rkd_weights(distance_weight, angle_weight)

    def forward(self, student_emb: torch.Tensor, teacher_emb: torch.Tensor) -> torch.Tensor:
        return rkd_loss(student_emb, teacher_emb, distance_weight=self.distance_weight,
                        angle_weight=self.angle_weight)

    def extra_repr(self) -> str:
        return f"distance_weight={self.distance_weight}, angle_weight={self.angle_weight}"


# ----------------------------------------------------------------------------- PKT

def _pkt_conditional(x: torch.Tensor, eps: float) -> torch.Tensor:
    """``P[i, j]`` ``[N, N]``: the cosine kernel of the rows of ``x``, self-pairs included,
    each row divided by its sum."""
    norm = torch.linalg.vector_norm(x, dim=1, keepdim=True)   # gradient 0 at a zero row
    unit = x / (norm + eps)                                   # eps > 0: never 0 / 0
    # rounding can leave a cosine a few ulps below -1; the clamp keeps log(K + eps) finite
    kernel = ((unit @ unit.t() + 1.0) * 0.5).clamp_min(0.0)
    # every row sum is >= K_ii = (1 + |u_i|^2) / 2 >= 1/2: no division by zero
    return kernel / kernel.sum(dim=1, keepdim=True)


def pkt_loss(student: torch.Tensor, teacher: torch.Tensor, *, eps: float = 1e-7) -> torch.Tensor:
    r"""Probabilistic knowledge transfer (Passalis & Tefas, "Learning Deep Representations with
    Probabilistic Knowledge Transfer", ECCV 2018): the student matches the teacher's
    distribution of neighbours, estimated with a cosine-similarity kernel.

    For each side, with rows ``x_i`` (``N`` samples)::

        u_i  = x_i / (|x_i| + eps)
        K_ij = (1 + <u_i, u_j>) / 2                   (all i, j, the diagonal included)
        P_ij = K_ij / sum_k K_ik                      (each row divided by its sum)
        loss = 1/N^2 * sum over ALL i, j of P^t_ij * log((P^t_ij + eps) / (P^s_ij + eps))

    i.e. ``KL(teacher || student)`` of each row's distribution, with ``eps`` smoothing the
    logarithm, averaged over all ``N^2`` entries (``torch.mean`` of the full matrix). These
    are the conventions of the widely used published implementations, and the numbers are
    the same: the self-pairs ``j == i`` (``K_ii`` = 1 for a nonzero row) stay in the rows,
    and the divisor is ``N^2``, not ``N``.

    Conventions: an all-zero feature row has ``u_i = 0`` (``eps > 0``, so no ``0 / 0``; the
    NaN the published code zeroes never arises), hence ``K_ij = 1/2`` for every ``j``;
    its gradient is the derivative of ``x / (|x| + eps)`` at 0, ``1 / eps`` times the
    identity, finite. Every row sum is at least ``K_ii >= 1/2``, so no division by zero.
    ``N = 0`` gives 0 (not the NaN of an empty mean), ``N = 1`` gives 0 (``P = [[1]]`` on
    both sides). The teacher is not detached (gradients reach it when it requires grad).
    Cost: two ``[N, N]`` kernels (matmuls), ``O(N^2 + N D)`` memory.

    Args:
        student: ``[N, Ds]`` (or ``[N, ...]``, flattened), any float dtype.
        teacher: ``[N, Dt]`` (or ``[N, ...]``); ``Dt`` may differ from ``Ds``.
        eps: > 0, added to the norms and inside the logarithm (default ``1e-7``).

    Returns:
        0-dim float32 tensor (float64 if an input is float64).

    Example::

        >>> import torch, kdfast
        >>> student = torch.randn(64, 128, requires_grad=True)
        >>> teacher = torch.randn(64, 2048)
        >>> loss = kdfast.pkt_loss(student, teacher)
        >>> loss.backward()
    """
    eps = _check_eps("pkt_loss", eps)
    _check_batch_pair("pkt_loss", "student", student, "teacher", teacher)
    dtype = _compute_dtype(student, teacher)
    n = student.shape[0]
    p_s = _pkt_conditional(_rows(student, dtype), eps)
    p_t = _pkt_conditional(_rows(teacher, dtype), eps)
    kl = p_t * torch.log((p_t + eps) / (p_s + eps))
    return kl.sum() / max(n * n, 1)     # the mean over all N^2 entries; N = 0 gives 0


class PKTLoss(nn.Module):
    """Module form of :func:`kdfast.pkt_loss` (probabilistic knowledge transfer, Passalis &
    Tefas, ECCV 2018).

    Shapes: ``student`` ``[N, Ds]``, ``teacher`` ``[N, Dt]`` (or ``[N, ...]``).

    Example::

        >>> crit = kdfast.PKTLoss()
        >>> loss = crit(student_features, teacher_features.detach())
    """

    def __init__(self, eps: float = 1e-7) -> None:
        super().__init__()
        self.eps = _check_eps("pkt_loss", eps)

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        return pkt_loss(student, teacher, eps=self.eps)

    def extra_repr(self) -> str:
        return f"eps={self.eps}"


# ----------------------------------------------------------------------------- SP

def _sp_similarity(x: torch.Tensor) -> torch.Tensor:
    """Row-normalised batch similarity ``[b, b]`` of ``x`` ``[b, D]``."""
    return _normalize_rows(x @ x.t())


def _sp_pair(fn: str, s_name: str, student: torch.Tensor, t_name: str,
             teacher: torch.Tensor) -> torch.Tensor:
    _check_batch_pair(fn, s_name, student, t_name, teacher)
    dtype = _compute_dtype(student, teacher)
    b = student.shape[0]
    g_s = _sp_similarity(_rows(student, dtype))
    g_t = _sp_similarity(_rows(teacher, dtype))
    return (g_s - g_t).square().sum() / max(b * b, 1)


def sp_loss(student_feat: torch.Tensor | Sequence[torch.Tensor],
            teacher_feat: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
    r"""Similarity-preserving knowledge distillation (Tung & Mori, "Similarity-Preserving
    Knowledge Distillation", ICCV 2019): samples that the teacher finds similar should be
    similar for the student, compared through ``b x b`` batch similarity matrices.

    For one pair of features with batch size ``b``, ``F = feat.flatten(1)`` ``[b, D]``::

        G       = F F^T,      G_hat = G with each row divided by its L2 norm
        loss    = || G_hat_s - G_hat_t ||_F^2 / b^2

    (an all-zero row of ``G``, from an all-zero feature row, stays zero). Given lists of
    pairs (e.g. one per stage), the per-pair losses are summed; the paper's weight ``gamma``
    is left to the caller. The teacher is not detached. Cost: ``[b, b]`` matmuls,
    ``O(b^2 + b D)`` memory per pair.

    Args:
        student_feat: ``[b, ...]`` feature map (e.g. ``[b, C, H, W]``), any float dtype, or a
            list / tuple of them.
        teacher_feat: ``[b, ...]`` (its shape beyond ``b`` may differ), or a list / tuple of
            the same length.

    Returns:
        0-dim float32 tensor (float64 if an input is float64).

    Example::

        >>> import torch, kdfast
        >>> s = torch.randn(32, 64, 8, 8, requires_grad=True)
        >>> t = torch.randn(32, 256, 8, 8)
        >>> loss = kdfast.sp_loss(s, t)
        >>> s2, t2 = torch.randn(32, 128, 4, 4), torch.randn(32, 512, 4, 4)
        >>> loss = kdfast.sp_loss([s, s2], [t, t2])    # summed over the pairs
    """
    if isinstance(student_feat, torch.Tensor) and isinstance(teacher_feat, torch.Tensor):
        return _sp_pair("sp_loss", "student_feat", student_feat, "teacher_feat", teacher_feat)
    if isinstance(student_feat, torch.Tensor) or isinstance(teacher_feat, torch.Tensor):
        raise TypeError("sp_loss: student_feat and teacher_feat must both be tensors or both be "
                        f"lists of tensors, got {type(student_feat).__name__} and "
                        f"{type(teacher_feat).__name__}")
    for name, feats in (("student_feat", student_feat), ("teacher_feat", teacher_feat)):
        if not isinstance(feats, (list, tuple)):
            raise TypeError(f"sp_loss: {name} must be a tensor or a list / tuple of tensors, got "
                            f"{type(feats).__name__}")
    if len(student_feat) != len(teacher_feat):
        raise ValueError("sp_loss: student_feat and teacher_feat must hold the same number of "
                         f"feature maps, got {len(student_feat)} and {len(teacher_feat)}")
    if len(student_feat) == 0:
        raise ValueError("sp_loss: student_feat and teacher_feat are empty; pass at least one pair")
    total = None
    for k, (s, t) in enumerate(zip(student_feat, teacher_feat)):
        term = _sp_pair("sp_loss", f"student_feat[{k}]", s, f"teacher_feat[{k}]", t)
        total = term if total is None else total + term
    return total


class SPLoss(nn.Module):
    """Module form of :func:`kdfast.sp_loss` (similarity-preserving KD, Tung & Mori, ICCV 2019).

    Shapes: ``[b, ...]`` student and teacher features, or lists of such pairs (summed).

    Example::

        >>> crit = kdfast.SPLoss()
        >>> loss = crit([s_stage3, s_stage4], [t_stage3.detach(), t_stage4.detach()])
    """

    def forward(self, student_feat: torch.Tensor | Sequence[torch.Tensor],
                teacher_feat: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
        return sp_loss(student_feat, teacher_feat)
