"""Attention transfer (Zagoruyko & Komodakis, ICLR 2017): the public function and module."""

from __future__ import annotations

import torch
from torch import nn

from kdfast import _extension, reference
from kdfast._args import FeatureMaps, check_at_p, check_feature_maps, feature_map_pairs
from kdfast.ops._kept import gradient_in_forward

__all__ = ["AttentionTransferLoss", "attention_transfer_loss"]


def _one_pair(student_feat: torch.Tensor, teacher_feat: torch.Tensor, p: float) -> torch.Tensor:
    if _extension.has_kernel_cached("attention_transfer_fused", student_feat.device.type):
        loss, _, _, _ = torch.ops.kdfast.attention_transfer_fused(
            student_feat, teacher_feat, p, gradient_in_forward(student_feat),
            gradient_in_forward(teacher_feat))
        return loss
    _extension.warn_fallback(student_feat.device.type)
    return reference.attention_transfer_loss(student_feat, teacher_feat, p=p)


def attention_transfer_loss(student_feat: FeatureMaps, teacher_feat: FeatureMaps, *,
                            p: float = 2.0) -> torch.Tensor:
    r"""Attention transfer loss (Zagoruyko & Komodakis, ICLR 2017), fused.

    For a feature map ``x`` of shape ``[N, C, H, W]`` the attention map is the mean over
    channels of ``|x|**p``, flattened and L2-normalised over the ``H * W`` positions of
    each sample, exactly ``F.normalize(x.abs().pow(p).mean(1).flatten(1), dim=1)`` (eps
    ``1e-12``, so an all-zero map stays zero). The loss is the mean squared difference of
    the student's and the teacher's attention maps over ``N * H * W``::

        a = lambda x: F.normalize(x.abs().pow(p).mean(1).flatten(1), dim=1)
        loss = (a(student_feat) - a(teacher_feat)).pow(2).mean()

    For lists (or tuples) of feature-map pairs, e.g. one per network stage, the result is
    the sum of the pairs' losses.

    What is fused: one op per pair computes both attention maps, the normalisations, the
    loss and, when autograd will need it, the gradient ``(p / C) |x|**(p-1) sign(x) dL/dA``
    of the inputs in the same call; the backward only scales that kept gradient by the
    incoming gradient (in place, nothing when it is 1). On CPU a thread takes one sample
    at a time and reads it again for the gradient while it is still in cache (each input
    is read from memory once, the gradient written once). float16
    gradients are computed in the backward instead, where a loss scale is known (one more
    read of the inputs). Memory kept between forward and backward: the gradient (like
    its input), ``[N, 5]`` per-sample statistics, and references to the inputs; no
    attention maps (on CUDA they are a temporary of ``2 N H W`` floats during each call,
    ``2 / C`` of a float32 input).

    Args:
        student_feat: ``[N, C_s, H, W]`` float32 / float16 / bfloat16 (float64 for
            gradcheck), or a list / tuple of them. NCHW-contiguous and channels_last
            tensors (and NCHW slices along N or C) are read in place, others copied once.
            Receives the gradient (channels_last for a channels_last input).
        teacher_feat: ``[N, C_t, H, W]`` with the student's ``N``, ``H``, ``W``; the
            channel count and dtype may differ. Receives a gradient too when it requires
            grad. A list / tuple of the same length when ``student_feat`` is one.
        p: exponent, finite and ``>= 1`` (the paper's default 2). ``p = 1`` and ``p = 2``
            use ``|x|`` and ``x * x``, other values ``pow``; the derivative at ``x = 0`` is 0
            (``sign(0) = 0``). A map whose ``mean |x|**p`` overflows float32 gives NaN.

    Returns:
        A 0-dim float32 tensor (float64 for float64 inputs).

    Example::

        >>> import torch, kdfast
        >>> student = torch.randn(8, 64, 28, 28, requires_grad=True)
        >>> teacher = torch.randn(8, 256, 28, 28)
        >>> loss = kdfast.attention_transfer_loss(student, teacher)
        >>> loss.backward()
        >>> # one term per stage, summed
        >>> s_feats = [torch.randn(8, 32, 56, 56), torch.randn(8, 64, 28, 28)]
        >>> t_feats = [torch.randn(8, 128, 56, 56), torch.randn(8, 256, 28, 28)]
        >>> total = kdfast.attention_transfer_loss(s_feats, t_feats, p=2.0)
    """
    p = check_at_p(p)
    pairs = feature_map_pairs(student_feat, teacher_feat)
    single = isinstance(student_feat, torch.Tensor)
    for i, (s, t) in enumerate(pairs):
        check_feature_maps(s, t, "" if single else f" (pair {i})")
    total = _one_pair(*pairs[0], p)
    for s, t in pairs[1:]:
        total = total + _one_pair(s, t, p)
    return total


class AttentionTransferLoss(nn.Module):
    """Module form of :func:`kdfast.attention_transfer_loss`; ``p`` is fixed at construction.

    Shapes: ``student_feat`` ``[N, C_s, H, W]``, ``teacher_feat`` ``[N, C_t, H, W]``, or
    lists / tuples of such pairs (the losses are summed).

    Example::

        >>> crit = kdfast.AttentionTransferLoss(p=2.0)
        >>> loss = crit(student_feat, teacher_feat)
    """

    def __init__(self, p: float = 2.0) -> None:
        super().__init__()
        self.p = check_at_p(p)

    def forward(self, student_feat: FeatureMaps, teacher_feat: FeatureMaps) -> torch.Tensor:
        return attention_transfer_loss(student_feat, teacher_feat, p=self.p)

    def extra_repr(self) -> str:
        return f"p={self.p}"
