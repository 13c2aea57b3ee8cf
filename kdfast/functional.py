"""Public loss functions of kdfast."""

from __future__ import annotations

import torch

from kdfast import _extension, reference
from kdfast._args import DIVERGENCES, REDUCTIONS, check_options, check_tensors
from kdfast.ops._kept import gradient_in_forward

__all__ = ["DIVERGENCES", "REDUCTIONS", "kd_loss"]


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
            labels: torch.Tensor | None = None, *, temperature: float = 1.0,
            alpha: float = 0.0, divergence: str = "forward_kl", beta: float = 0.5,
            ignore_index: int = -100, reduction: str = "batchmean",
            softcap: float | None = None) -> torch.Tensor:
    r"""Temperature-softmax distillation loss with an optional hard-label term, fused.

    Per row ``i`` (every position of the leading dimensions), with
    ``p = softmax(teacher_logits / T)`` and ``q = softmax(student_logits / T)``::

        loss_i = (1 - alpha) * T**2 * D(p, q) + alpha * cross_entropy(student_logits_i, labels_i)

    where ``D`` is ``KL(p||q)`` (``"forward_kl"``, Hinton et al. 2015), ``KL(q||p)``
    (``"reverse_kl"``) or ``beta*KL(p||m) + (1-beta)*KL(q||m)`` with
    ``m = beta*p + (1-beta)*q`` (``"jsd"``). The cross-entropy uses temperature 1.
    All math is in float32 whatever the input dtype, and there are no ``[N, V]``
    float32 temporaries.

    When autograd will need a gradient (grad mode on and an input requires grad), the
    gradient is computed in the same pass over the logits as the loss and kept until
    the backward, which only scales it by the incoming gradient (in place, skipping the
    work when that is 1): each input is read once, the gradient written once. float16
    gradients are the exception: they are computed in the backward, where a loss scale
    (``torch.amp.GradScaler``) is known, since kept at scale 1 they would underflow. Memory
    kept between forward and backward: the gradient (like the input it belongs to) and
    ``O(rows)`` statistics (the inputs are referenced too, for a gradient recomputed in
    the backward). With ``retain_graph=True`` each backward returns a scaled copy of
    the kept gradient. Without a gradient (``torch.no_grad()``, inference) only the
    loss is computed. Paths and memory: ``docs/kd_loss_math.md``.

    Args:
        student_logits: ``[..., V]`` float32 / float16 / bfloat16, any strides.
            Receives the gradient.
        teacher_logits: ``[..., V]``, same shape; its dtype may differ from the
            student's. Receives a gradient too when it requires grad (online /
            mutual distillation).
        labels: ``[...]`` integer class indices, needed when ``alpha > 0``. Rows whose
            label equals ``ignore_index`` contribute nothing and are not counted.
        temperature: softening temperature ``T > 0``; the divergence is scaled by ``T**2``.
        alpha: weight of the hard-label cross-entropy, in ``[0, 1]``.
        divergence: ``"forward_kl"``, ``"reverse_kl"`` or ``"jsd"``.
        beta: the JSD mixture weight, in ``(0, 1)`` (used by ``"jsd"`` only).
        ignore_index: label value of rows to skip.
        reduction: ``"batchmean"`` (sum over counted rows / their number, 0 when none),
            ``"sum"``, or ``"none"`` (shape ``[...]``, zeros on ignored rows).
        softcap: Gemma-style logit soft-capping ``c * tanh(x / c)`` applied to every
            student and teacher logit before the temperature (and before the
            cross-entropy), with gradients through it; ``-inf`` (masked) entries stay
            masked. ``None`` (default): no cap.

    Returns:
        float32 tensor (float64 for float64 inputs): 0-dim, or ``[...]`` for ``"none"``.

    Example::

        >>> import torch, kdfast
        >>> student = torch.randn(32, 1000, requires_grad=True)
        >>> teacher = torch.randn(32, 1000)
        >>> labels = torch.randint(0, 1000, (32,))
        >>> loss = kdfast.kd_loss(student, teacher, labels, temperature=4.0, alpha=0.1)
        >>> loss.backward()
    """
    div_code = check_options(temperature, alpha, divergence, beta, reduction, ignore_index,
                             softcap)
    labels = check_tensors(student_logits, teacher_logits, labels, alpha)
    if _extension.has_kernel_cached("kd_loss_fused", student_logits.device.type):
        loss, _, _, _ = torch.ops.kdfast.kd_loss_fused(
            student_logits, teacher_logits, labels, float(temperature), float(alpha), div_code,
            float(beta), ignore_index, 0.0 if softcap is None else float(softcap),
            REDUCTIONS.index(reduction), gradient_in_forward(student_logits),
            gradient_in_forward(teacher_logits))
        return loss
    _extension.warn_fallback(student_logits.device.type)
    return reference.kd_loss(student_logits, teacher_logits, labels, temperature=temperature,
                             alpha=alpha, divergence=divergence, beta=beta,
                             ignore_index=ignore_index, reduction=reduction, softcap=softcap)
