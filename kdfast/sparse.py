"""Sparse teacher outputs: what a teacher cache stores, and the loss that trains from them.

- :func:`topk_logits`: the k most likely tokens of each row and their full-vocabulary
  log-probabilities (a top-k cache; ``tail="residual"`` recovers the missing mass).
- :func:`sample_logits`: tokens drawn from the teacher distribution with replacement,
  each distinct token once with weight ``count / num_samples`` (an unbiased estimate of
  the teacher distribution: Anshumann et al., "Sparse Logit Sampling", ACL 2025).
- :func:`sparse_kd_loss` / :class:`SparseKDLoss`: distillation from either, without
  ever forming a dense teacher.

Example::

    >>> import torch, kdfast
    >>> teacher = torch.randn(8, 32000)
    >>> idx, logp = kdfast.topk_logits(teacher, 64)             # store these
    >>> student = torch.randn(8, 32000, requires_grad=True)
    >>> kdfast.sparse_kd_loss(student, idx, logp, tail="residual").backward()
"""

from __future__ import annotations

import torch
from torch import nn

from kdfast import _extension, reference
from kdfast._args import (
    REDUCTIONS,
    SPARSE_TAILS,
    check_sample_args,
    check_sparse_kd_options,
    check_sparse_kd_tensors,
    check_topk_args,
)
from kdfast.ops._kept import gradient_in_forward

__all__ = ["SparseKDLoss", "sample_logits", "sparse_kd_loss", "topk_logits"]


def topk_logits(teacher_logits: torch.Tensor, k: int, *, temperature: float = 1.0,
                index_dtype: torch.dtype = torch.int64) -> tuple[torch.Tensor, torch.Tensor]:
    r"""The ``k`` largest logits of each row and their full-vocabulary log-probabilities.

    One fused pass over each row finds the top ``k`` and the row's log-normaliser, so
    ``logprobs = log_softmax(teacher_logits / T)[indices]`` exactly (not renormalised over
    the top k): ``1 - logprobs.exp().sum(-1)`` is the teacher's missing mass, which
    :func:`sparse_kd_loss` uses with ``tail="residual"``.

    Args:
        teacher_logits: ``[..., V]`` float32 / float16 / bfloat16 (float64 for testing), any
            strides.
        k: entries kept per row, ``1 <= k <= min(V, 4096)``.
        temperature: ``T > 0`` of the softmax the log-probabilities belong to.
        index_dtype: ``torch.int64`` (default) or ``torch.int32``.

    Returns:
        ``(indices, logprobs)``: ``[..., k]`` each, sorted by descending logit (ties: lower
        index first; NaN first, as ``torch.sort``); ``logprobs`` float32 (float64 for float64
        input). A row of only ``-inf`` logits has no distribution: logprobs ``-inf`` (zero
        gradient); a row holding NaN or ``+inf`` gets NaN. ``logprobs`` is differentiable in
        ``teacher_logits``. Memory: the outputs only.

    Example::

        >>> idx, logp = kdfast.topk_logits(torch.randn(4, 128, 32000), 64, temperature=2.0)
        >>> idx.shape, logp.dtype
        (torch.Size([4, 128, 64]), torch.float32)
    """
    check_topk_args(teacher_logits, k, temperature, index_dtype)
    if _extension.has_kernel_cached("topk_logits", teacher_logits.device.type):
        return torch.ops.kdfast.topk_logits(teacher_logits, k, float(temperature), index_dtype)
    _extension.warn_fallback(teacher_logits.device.type)
    return reference.topk_logits(teacher_logits, k, temperature=temperature,
                                 index_dtype=index_dtype)


def _seed(generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """A 0-dim int64 seed on ``device``, drawn from ``generator`` (the default generator of
    ``device`` when None) on the generator's own device: no host synchronisation."""
    where = generator.device if generator is not None else device
    seed = torch.randint(0, 2**62, (), dtype=torch.int64, generator=generator, device=where)
    return seed.to(device, non_blocking=True)


def sample_logits(teacher_logits: torch.Tensor, num_samples: int, *, temperature: float = 1.0,
                  generator: torch.Generator | None = None,
                  index_dtype: torch.dtype = torch.int64) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Draws ``num_samples`` tokens per row from ``softmax(teacher_logits / T)``, with
    replacement, and returns each distinct token once with weight ``count / num_samples``.

    The weights are an unbiased estimate of the teacher distribution: their mean over
    many draws converges to ``softmax(teacher_logits / T)`` (Anshumann et al., "Sparse Logit
    Sampling", ACL 2025, where about 12 draws per token matched dense distillation).
    Train on them with ``sparse_kd_loss(..., values="probs")``.

    Args:
        teacher_logits: ``[..., V]`` float32 / float16 / bfloat16 (float64 for testing), any
            strides.
        num_samples: draws per row ``S``, ``1 <= S <= 4096``.
        temperature: ``T > 0``.
        generator: the ``torch.Generator`` the draws come from (one seed per call is drawn
            from it); None uses the default generator of the logits' device. The same
            generator state gives the same draws. The kernels draw from Philox-4x32-10 keyed
            by (seed, row, draw), the same numbers on CPU and CUDA (docs/topk_sample.md).
            ``torch.compile`` cannot trace a generator object (a graph break); with
            ``fullgraph=True`` use None, or call ``torch.ops.kdfast.sample_logits`` with a
            seed tensor.
        index_dtype: ``torch.int64`` (default) or ``torch.int32``.

    Returns:
        ``(indices, probs)``: ``[..., S]`` each; the distinct tokens drawn in ascending
        index order, then padding (index ``-1``, weight 0). ``probs`` is float32 and sums
        to 1 over a row. Rows without a finite softmax (all ``-inf``, NaN) are all padding.
        Not differentiable. Memory: the outputs only.

    Example::

        >>> g = torch.Generator().manual_seed(0)
        >>> idx, w = kdfast.sample_logits(torch.randn(4, 32000), 12, generator=g)
        >>> w.sum(-1)
        tensor([1., 1., 1., 1.])
    """
    check_sample_args(teacher_logits, num_samples, temperature, generator, index_dtype)
    if _extension.has_kernel_cached("sample_logits", teacher_logits.device.type):
        seed = _seed(generator, teacher_logits.device)
        return torch.ops.kdfast.sample_logits(teacher_logits.detach(), num_samples,
                                              float(temperature), seed, index_dtype)
    _extension.warn_fallback(teacher_logits.device.type)
    return reference.sample_logits(teacher_logits, num_samples, temperature=temperature,
                                   generator=generator, index_dtype=index_dtype)


def sparse_kd_loss(student_logits: torch.Tensor, teacher_indices: torch.Tensor,
                   teacher_values: torch.Tensor, labels: torch.Tensor | None = None, *,
                   values: str = "logprobs", temperature: float = 1.0,
                   tail: str = "renormalize", alpha: float = 0.0, ignore_index: int = -100,
                   reduction: str = "batchmean") -> torch.Tensor:
    r"""Distillation loss from a sparse teacher (top-k or sampled), fused, never dense.

    Per row, with the student ``q = softmax(student_logits / T)`` over the full vocabulary
    and the teacher given on its support ``S`` (the entries of ``teacher_indices`` that are
    not ``-1``) as ``p_j = exp(v_j)`` (``values="logprobs"``) or ``p_j = v_j``
    (``values="probs"``)::

        tail="renormalize":  D = sum_S p^_j (log p^_j - log q_j),   p^ = p / sum_S p
        tail="residual":     D = sum_S p_j (log p_j - log q_j) + r_t (log r_t - log r_s),
                             r_t = 1 - sum_S p,  r_s = 1 - sum_S q  (the mass off the support)
        loss_i = (1 - alpha) * T**2 * D + alpha * cross_entropy(student_logits_i, labels_i)

    The cross-entropy uses temperature 1; ``labels``, ``ignore_index`` and ``reduction``
    behave exactly as in :func:`kdfast.kd_loss`. A row with an empty support has ``D = 0``.
    The support entries of a row must be distinct (as :func:`topk_logits` and
    :func:`sample_logits` give them).

    Memory: no dense teacher and no ``[N, V]`` float32 temporary; when autograd needs the
    student's gradient it is computed in the same pass and kept until the backward
    (float16 students: recomputed there, as in :func:`kdfast.kd_loss`), plus ``O(rows)``
    statistics.

    Args:
        student_logits: ``[..., V]`` float32 / float16 / bfloat16, any strides. Receives the
            gradient.
        teacher_indices: ``[..., K]`` int64 or int32, token ids in ``[0, V)`` or ``-1``
            (padding, ignored).
        teacher_values: ``[..., K]`` float, log-probabilities or probabilities (see
            ``values``), at the same temperature ``T``. Gets no gradient.
        labels: ``[...]`` integer class indices, needed when ``alpha > 0``.
        values: ``"logprobs"`` (from :func:`topk_logits`) or ``"probs"`` (from
            :func:`sample_logits`).
        temperature: ``T > 0``; the divergence is scaled by ``T**2``.
        tail: ``"renormalize"`` or ``"residual"`` (see above).
        alpha: weight of the hard-label cross-entropy, in ``[0, 1]``.
        ignore_index: label value of rows to skip.
        reduction: ``"batchmean"``, ``"sum"`` or ``"none"``.

    Returns:
        float32 tensor (float64 for float64 inputs): 0-dim, or ``[...]`` for ``"none"``.

    Example::

        >>> teacher = torch.randn(32, 32000)
        >>> idx, logp = kdfast.topk_logits(teacher, 64, temperature=2.0)
        >>> student = torch.randn(32, 32000, requires_grad=True)
        >>> loss = kdfast.sparse_kd_loss(student, idx, logp, temperature=2.0, tail="residual")
        >>> loss.backward()
    """
    check_sparse_kd_options(values, temperature, tail, alpha, ignore_index, reduction)
    labels = check_sparse_kd_tensors(student_logits, teacher_indices, teacher_values, labels,
                                     alpha)
    if _extension.has_kernel_cached("sparse_kd_loss_fused", student_logits.device.type):
        loss, _, _ = torch.ops.kdfast.sparse_kd_loss_fused(
            student_logits, teacher_indices, teacher_values.detach(), labels, float(temperature),
            float(alpha), values == "logprobs", SPARSE_TAILS.index(tail), ignore_index,
            REDUCTIONS.index(reduction), gradient_in_forward(student_logits))
        return loss
    _extension.warn_fallback(student_logits.device.type)
    return reference.sparse_kd_loss(student_logits, teacher_indices, teacher_values, labels,
                                    values=values, temperature=temperature, tail=tail,
                                    alpha=alpha, ignore_index=ignore_index, reduction=reduction)


class SparseKDLoss(nn.Module):
    """Module form of :func:`sparse_kd_loss`; the options are fixed at construction.

    Shapes: ``student_logits`` ``[..., V]``; ``teacher_indices``, ``teacher_values``
    ``[..., K]``; ``labels`` ``[...]``.

    Example::

        >>> crit = kdfast.SparseKDLoss(values="probs", temperature=1.0)
        >>> idx, w = kdfast.sample_logits(teacher_logits, 12)
        >>> loss = crit(student_logits, idx, w)
    """

    def __init__(self, values: str = "logprobs", temperature: float = 1.0,
                 tail: str = "renormalize", alpha: float = 0.0, ignore_index: int = -100,
                 reduction: str = "batchmean") -> None:
        super().__init__()
        check_sparse_kd_options(values, temperature, tail, alpha, ignore_index, reduction)
        self.values = values
        self.temperature = temperature
        self.tail = tail
        self.alpha = alpha
        self.ignore_index = ignore_index
        self.reduction = reduction

    def forward(self, student_logits: torch.Tensor, teacher_indices: torch.Tensor,
                teacher_values: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        return sparse_kd_loss(student_logits, teacher_indices, teacher_values, labels,
                              values=self.values, temperature=self.temperature, tail=self.tail,
                              alpha=self.alpha, ignore_index=self.ignore_index,
                              reduction=self.reduction)

    def extra_repr(self) -> str:
        return (f"values={self.values!r}, temperature={self.temperature}, tail={self.tail!r}, "
                f"alpha={self.alpha}, ignore_index={self.ignore_index}, "
                f"reduction={self.reduction!r}")
