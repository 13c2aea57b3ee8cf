"""Fake kernels and autograd for ``kdfast::topk_logits`` and ``kdfast::sample_logits``.

``topk_logits``'s log-probabilities are differentiable in the logits: with
``p = softmax(x / T)`` and ``j`` an output column holding token ``idx_j``,
``d logprob_j / d x_i = (delta(i, idx_j) - p_i) / T``, so the gradient of a row is
``(scatter(g) - p * sum(g)) / T``. The backward is plain PyTorch (one ``softmax`` of the
row in the accumulation dtype): the gradient of a cache writer's teacher is rarely
wanted, and when it is, the ``[..., V]`` gradient it returns is the same size. Rows
without a distribution (every logit ``-inf``, logprobs ``-inf``) get a zero gradient;
rows holding NaN or ``+inf`` a NaN one.

``sample_logits`` is not differentiable: its outputs are marked so, and the logits get
no gradient from them.
"""

from __future__ import annotations

import torch

from kdfast.ops._kept import acc_dtype


def _leading(x: torch.Tensor, width: int) -> tuple:
    return (*x.shape[:-1], width)


@torch.library.register_fake("kdfast::topk_logits")
def _topk_logits_fake(logits, k, temperature, index_dtype):
    torch._check(logits.dim() >= 1, lambda: "topk_logits: teacher_logits must have shape [..., V]")
    torch._check(1 <= k, lambda: f"topk_logits: k must be >= 1, got {k}")
    torch._check(k <= logits.shape[-1], lambda: "topk_logits: k must be <= the vocabulary size")
    shape = _leading(logits, k)
    return logits.new_empty(shape, dtype=index_dtype), logits.new_empty(shape, dtype=acc_dtype(logits))


@torch.library.register_fake("kdfast::sample_logits")
def _sample_logits_fake(logits, num_samples, temperature, seed, index_dtype):
    torch._check(logits.dim() >= 1, lambda: "sample_logits: teacher_logits must have shape [..., V]")
    torch._check(num_samples >= 1, lambda: f"sample_logits: num_samples must be >= 1, got {num_samples}")
    shape = _leading(logits, num_samples)
    return logits.new_empty(shape, dtype=index_dtype), logits.new_empty(shape, dtype=torch.float32)


def topk_logits_backward(grad_logprobs: torch.Tensor, logits: torch.Tensor, indices: torch.Tensor,
                         logprobs: torch.Tensor, temperature: float) -> torch.Tensor:
    """d loss / d logits from d loss / d logprobs of :func:`kdfast.topk_logits`.

    Shapes: ``grad_logprobs``, ``indices``, ``logprobs`` ``[..., k]``; ``logits`` ``[..., V]``.
    Returns a contiguous gradient of ``logits``' shape and dtype.
    """
    acc = acc_dtype(logits)
    g = grad_logprobs.to(acc)
    x = logits.to(acc)
    empty = logprobs[..., :1] == float("-inf")  # every logit -inf: no distribution
    p = torch.softmax(torch.where(empty, 0.0, x) / temperature, dim=-1)
    grad = (-p * g.sum(-1, keepdim=True)).scatter_add_(-1, indices.long(), g) / temperature
    return torch.where(empty, 0.0, grad).to(logits.dtype).contiguous()


def _topk_setup_context(ctx, inputs, output):
    logits, _k, temperature, _index_dtype = inputs
    indices, logprobs = output
    ctx.mark_non_differentiable(indices)
    ctx.temperature = temperature
    if ctx.needs_input_grad[0]:
        ctx.save_for_backward(logits, indices, logprobs)


def _topk_backward(ctx, _grad_indices, grad_logprobs):
    if grad_logprobs is None or not ctx.needs_input_grad[0]:
        return None, None, None, None
    logits, indices, logprobs = ctx.saved_tensors
    return topk_logits_backward(grad_logprobs, logits, indices, logprobs, ctx.temperature), None, None, None


torch.library.register_autograd("kdfast::topk_logits", _topk_backward, setup_context=_topk_setup_context)


def _sample_setup_context(ctx, inputs, output):
    ctx.mark_non_differentiable(*output)


def _sample_backward(ctx, _grad_indices, _grad_probs):
    return None, None, None, None, None


torch.library.register_autograd("kdfast::sample_logits", _sample_backward,
                                setup_context=_sample_setup_context)
