"""Relational distillation losses: the student matches how the teacher relates the samples
of a batch to each other, not the teacher's features themselves.

- :func:`rkd_loss` / :class:`RKDLoss`: relational KD, distance- and angle-wise (Park et al.,
  CVPR 2019).
- :func:`pkt_loss` / :class:`PKTLoss`: probabilistic knowledge transfer (Passalis & Tefas,
  ECCV 2018).
- :func:`sp_loss` / :class:`SPLoss`: similarity-preserving KD (Tung & Mori, ICCV 2019).

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


def _safe_reciprocal(x: torch.Tensor) -> torch.Tensor:
    """``1 / x`` where ``x > 0``, 0 elsewhere, with finite gradients at 0 (the inner
    ``where`` keeps ``1 / 0`` out of the graph, so no ``0 * inf`` in the backward)."""
    positive = x > 0
    return torch.where(positive, 1.0 / torch.where(positive, x, torch.ones_like(x)),
                       torch.zeros_like(x))


def _normalize_rows(x: torch.Tensor, eps: float = 0.0) -> torch.Tensor:
    """Each row divided by ``max(||row||, eps)``; all-zero rows stay zero (gradient 0)."""
    norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
    if eps > 0:
        norm = norm.clamp_min(eps)
    return x * _safe_reciprocal(norm)


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

def _rkd_relations(x: torch.Tensor, angles: bool
                   ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Distance potentials ``[N, N]`` and, if ``angles``, angle potentials ``[N, N, N]`` of
    the rows of ``x`` ``[N, D]`` with their ``i == k`` diagonal ``[N, N]``.

    ``diff[j, i] = x_i - x_j`` is formed exactly (a Gram-matrix ``|x_i|^2 + |x_j|^2 - 2 x_i.x_j``
    would cancel catastrophically for close points and leave coincident ones at a rounding
    residue instead of 0). ``cos[j, i, k]`` is the Gram matrix of the normalised differences
    around each anchor ``j``: one batched matmul, never an ``N x N x N x D`` tensor. Its
    diagonal ``cos[j, i, i] = |unit[j, i]|^2`` is returned as the constant it is (1, or 0
    for a coincident pair; its gradient is 0, the normalisation removes the radial
    direction), so taking it out of a sum costs ``O(N^2)``, not an ``N^3`` buffer.
    """
    n = x.shape[0]
    diff = x.unsqueeze(0) - x.unsqueeze(1)                  # [N(j), N(i), D]
    dist = torch.linalg.vector_norm(diff, dim=-1)           # [N, N], dist[j, i] = |x_i - x_j|
    mean_dist = dist.sum() / max(n * (n - 1), 1)            # mean over the distinct pairs
    potentials = dist * _safe_reciprocal(mean_dist)
    if not angles:
        return potentials, None, None
    unit = diff * _safe_reciprocal(dist).unsqueeze(-1)      # coincident pairs -> zero vector
    cos = torch.bmm(unit, unit.transpose(1, 2))             # [N(j), N(i), N(k)]
    return potentials, cos, (dist > 0).to(x.dtype)


def rkd_loss(student_emb: torch.Tensor, teacher_emb: torch.Tensor, *,
             distance_weight: float = 25.0, angle_weight: float = 50.0) -> torch.Tensor:
    r"""Relational knowledge distillation (Park et al., "Relational Knowledge Distillation",
    CVPR 2019): the student matches the teacher's pairwise distances and triplet angles.

    With ``x`` the student rows and ``y`` the teacher rows (``N`` samples), ``d_ij = |x_i - x_j|``,
    the distance potential divides by the mean over the ``N(N-1)/2`` distinct pairs::

        psi_D(i, j) = d_ij / mean_{a<b} d_ab
        L_D = mean over pairs i != j of smooth_l1(psi_D^s(i, j) - psi_D^t(i, j))

    and the angle potential is the cosine of the angle at ``j`` of each triplet::

        psi_A(i, j, k) = < (x_i - x_j) / |x_i - x_j| , (x_k - x_j) / |x_k - x_j| >
        L_A = mean over triplets with i, j, k distinct of smooth_l1(psi_A^s - psi_A^t)

    ``smooth_l1`` is the Huber loss with ``beta = 1`` (``0.5 z^2`` for ``|z| < 1``, else
    ``|z| - 0.5``), and the loss is ``distance_weight * L_D + angle_weight * L_A`` (the
    defaults 25 and 50 are the paper's). Pair and triplet means skip the degenerate entries
    ``i == j`` (and ``i == k``), so they do not dilute the loss with zeros.

    Conventions:

    - Too small a batch: ``L_D`` is 0 for ``N < 2`` and ``L_A`` is 0 for ``N < 3`` (no pairs /
      triplets); the loss is still part of the graph, with zero gradients.
    - Coincident points (``x_i == x_j``, e.g. repeated samples or dead embeddings): their
      distance is 0 and their "direction" is the zero vector, so every angle with that pair
      as a leg has cosine 0. The gradient there is the zero subgradient, never NaN. When all
      points coincide, ``psi_D`` is 0.
    - The teacher is not detached: gradients reach ``teacher_emb`` when it requires grad.
      Detach it (or run the teacher under ``torch.no_grad()``) for a frozen teacher.

    Cost: the pairwise differences ``[N, N, D]`` (exact, not from a Gram matrix), the
    angle cosines ``[N, N, N]`` as one batched matmul of the normalised differences
    (``O(N^3 D)`` flops, ``O(N^2 D + N^3)`` memory per side; never ``N^3 x D``). With
    ``angle_weight=0`` only ``O(N^2 D)``.

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
    angles = aw > 0 and n >= 3
    dist_s, cos_s, diag_s = _rkd_relations(_rows(student_emb, dtype), angles)
    dist_t, cos_t, diag_t = _rkd_relations(_rows(teacher_emb, dtype), angles)
    # zero, but part of the graph: a batch too small for any term still back-propagates (zeros)
    loss = (dist_s.sum() + dist_t.sum()) * 0.0
    if dw > 0:
        # The diagonal is exactly 0 on both sides, so summing the full matrix adds nothing.
        pair_sum = F.smooth_l1_loss(dist_s, dist_t, reduction="sum", beta=1.0)
        loss = loss + dw * (pair_sum / max(n * (n - 1), 1))
    if angles:
        assert cos_s is not None and cos_t is not None and diag_s is not None and diag_t is not None
        # Entries with i == j or k == j are 0 on both sides (zero difference vector); the
        # i == k diagonal (cosine 1, or 0 for a coincident pair) is taken out explicitly.
        all_sum = F.smooth_l1_loss(cos_s, cos_t, reduction="sum", beta=1.0)
        diag_sum = F.smooth_l1_loss(diag_s, diag_t, reduction="sum", beta=1.0)
        loss = loss + aw * ((all_sum - diag_sum) / (n * (n - 1) * (n - 2)))
    return loss


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
    """``p[i, j] = p_{j|i}`` ``[N, N]`` from the cosine kernel of the rows of ``x``."""
    n = x.shape[0]
    unit = _normalize_rows(x, eps)
    kernel = ((unit @ unit.t() + 1.0) * 0.5).clamp_min(0.0)   # rounding can dip below 0
    kernel = kernel.masked_fill(torch.eye(n, dtype=torch.bool, device=x.device), 0.0)
    return kernel * _safe_reciprocal(kernel.sum(dim=1, keepdim=True))


def pkt_loss(student: torch.Tensor, teacher: torch.Tensor, *, eps: float = 1e-7) -> torch.Tensor:
    r"""Probabilistic knowledge transfer (Passalis & Tefas, "Learning Deep Representations with
    Probabilistic Knowledge Transfer", ECCV 2018): the student matches the teacher's
    distribution of neighbours, estimated with a cosine-similarity kernel.

    For each side, with rows ``x_i`` (``N`` samples) and ``u_i = x_i / max(|x_i|, eps)``::

        K_ij    = (1 + <u_i, u_j>) / 2                    (in [0, 1])
        p_{j|i} = K_ij / sum_{k != i} K_ik                (j != i; self-pairs excluded)
        loss    = 1/N * sum_i sum_{j != i} p^t_{j|i} * log((p^t_{j|i} + eps) / (p^s_{j|i} + eps))

    i.e. ``KL(P_teacher || P_student)`` of each sample's conditional distribution, summed over
    the neighbours ``j`` and averaged over the anchors ``i`` (as ``batchmean`` does for
    :func:`kdfast.kd_loss`); ``eps`` keeps the logarithm finite where a probability is 0.
    Formulations that keep the self-pair ``j == i`` (whose kernel is always 1) and average
    over all ``N^2`` entries give different numbers.

    Conventions: ``N < 2`` gives 0 (no neighbours); an all-zero feature row has cosine 0 with
    every other row; a row whose kernel sums to 0 (possible only for ``N = 2``, antipodal
    points) gets an all-zero distribution. The teacher is not detached (gradients reach it
    when it requires grad). Cost: two ``[N, N]`` kernels (matmuls), ``O(N^2 + N D)`` memory.

    Args:
        student: ``[N, Ds]`` (or ``[N, ...]``, flattened), any float dtype.
        teacher: ``[N, Dt]`` (or ``[N, ...]``); ``Dt`` may differ from ``Ds``.
        eps: > 0, the norm floor and the smoothing inside the logarithm.

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
    kl = p_t * (torch.log(p_t + eps) - torch.log(p_s + eps))   # self-pairs: p_t == 0 -> 0
    return kl.sum() / max(n, 1)


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
