"""Causal-LM distillation of Hugging Face models without their ``[B, L, V]`` logits.

:func:`causal_lm_kd_loss` (a live teacher) and :func:`causal_lm_sparse_kd_loss` (a
sparse teacher: :func:`kdfast.topk_logits` of its logits, or a :mod:`kdfast.cache` top-k /
sampled cache) run the models, take the input of each one's LM head (the last hidden
states, after the final norm) and the head's ``weight`` / ``bias``, shift the labels
and call :func:`kdfast.fused_linear_kd_loss` / :func:`kdfast.fused_linear_sparse_kd_loss`:
the logits exist only ``chunk_size`` rows at a time. The value and the student's
gradients are those of the same loss on the full logits
(:func:`kdfast.integrations.hf.distillation_loss` with the model's ``.logits``).

How the hidden states are taken. The model is called as usual (``model(**batch)``,
through a DDP / ``accelerate`` wrapper; not compiled), with a forward pre-hook on its output
embeddings (``model.get_output_embeddings()``) that keeps the head's input and hands
the head only the first position, so the model computes ``[B, 1, V]`` logits instead of
``[B, L, V]``. Whatever the model does to the hidden states before its head is thus
included; what it does to the logits *after* the head is checked on that first
position, the first time a model is seen: Gemma-style ``final_logit_softcapping`` is
applied (as ``softcap``, it must then be the same for student and teacher), any other
transformation (``logit_scale``, ``logits_scaling``, ...) is refused with an error.

Rows are those of :func:`kdfast.integrations.hf.select_rows`: position ``i`` predicts
token ``i + 1`` (labels are shifted), positions whose shifted label is
``ignore_index`` are neither distilled nor counted; with no labels, the positions the
``attention_mask`` keeps (the token and the next one).

The loss (``a`` = ``alpha``, ``T`` the temperature), as in ``distillation_loss``::

    (1 - a) * T^2 * D(p_teacher || q_student)   averaged over the rows
    + a * CE(student, labels)                   averaged over the labelled rows (with labels)

computed by one fused call (the cross-entropy is the fused op's ``alpha`` term).
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

import kdfast
from kdfast._args import check_options, check_sparse_kd_options
from kdfast.integrations import require

transformers = require("transformers", extra="hf", feature="kdfast.integrations.hf_fused")

__all__ = ["LMHeadInputs", "causal_lm_kd_loss", "causal_lm_sparse_kd_loss", "lm_head_inputs"]

#: Models whose post-head transformation was checked: model -> its softcap (or None).
_CHECKED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_SCALE_ATTRS = ("logit_scale", "logits_scaling", "output_logits_scale", "logit_scaling")


class LMHeadInputs:
    """What :func:`lm_head_inputs` returns: ``hidden`` ``[B, L, H]`` (the LM head's input),
    ``weight`` ``[V, H]`` and ``bias`` (``[V]`` or ``None``) of the head, in the dtype the
    head computes in, and ``softcap`` (the model's ``final_logit_softcapping`` or ``None``)."""

    __slots__ = ("bias", "hidden", "softcap", "weight")

    def __init__(self, hidden: Tensor, weight: Tensor, bias: Tensor | None, softcap: float | None) -> None:
        self.hidden, self.weight, self.bias, self.softcap = hidden, weight, bias, softcap


def _unwrap(model: nn.Module) -> nn.Module:
    """The model inside DDP / DataParallel / ``torch.compile`` wrappers (for its head and config)."""
    seen = 0
    while seen < 8:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return model
        model, seen = inner, seen + 1
    return model


def _head_of(fn: str, who: str, model: nn.Module) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise TypeError(f"{fn}: {who} must be a Hugging Face causal LM (an nn.Module), got "
                        f"{type(model).__name__}")
    inner = _unwrap(model)
    get = getattr(inner, "get_output_embeddings", None)
    head = get() if callable(get) else None
    weight = getattr(head, "weight", None)
    if not isinstance(head, nn.Module) or not isinstance(weight, Tensor) or weight.dim() != 2:
        raise TypeError(f"{fn}: {who} ({type(inner).__name__}) has no linear LM head "
                        "(get_output_embeddings() with a [V, H] weight); pass a ...ForCausalLM / "
                        "...LMHeadModel")
    return head


def _declared_scale(model: nn.Module) -> str | None:
    config = getattr(model, "config", None)
    for attr in _SCALE_ATTRS:
        for owner in (model, config):
            value = getattr(owner, attr, None)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and float(value) != 1.0:
                return f"{attr}={value}"
    return None


def _softcap_of(model: nn.Module) -> float | None:
    config = getattr(model, "config", None)
    for cfg in (config, getattr(config, "text_config", None)):
        cap = getattr(cfg, "final_logit_softcapping", None)
        if isinstance(cap, (int, float)) and not isinstance(cap, bool) and cap > 0:
            return float(cap)
    return None


def _logits(out: Any) -> Tensor | None:
    logits = getattr(out, "logits", None)
    if logits is None and isinstance(out, Mapping):
        logits = out.get("logits")
    if logits is None and isinstance(out, (tuple, list)) and out and isinstance(out[0], Tensor):
        logits = out[0]
    return logits if isinstance(logits, Tensor) else None


def _compute_dtype(weight: Tensor, device: torch.device) -> torch.dtype:
    """The dtype the head computes in: autocast's when it is on (float16 -> float32: the
    fused ops take float32 / bfloat16), else the weight's."""
    if torch.is_autocast_enabled(device.type):
        dtype = torch.get_autocast_dtype(device.type)
        return torch.float32 if dtype == torch.float16 else dtype
    return torch.float32 if weight.dtype == torch.float16 else weight.dtype


def lm_head_inputs(model: nn.Module, inputs: Mapping[str, Any], *, fn: str = "lm_head_inputs",
                   who: str = "the model") -> LMHeadInputs:
    """Run ``model(**inputs)`` computing only the first position's logits and return the
    LM head's input and parameters (see the module's documentation).

    Args:
        model: a Hugging Face ``...ForCausalLM`` / ``...LMHeadModel`` (possibly wrapped
            in DDP or ``torch.compile``).
        inputs: its keyword arguments (``input_ids``, ``attention_mask``, ...; no
            ``labels``: the model would compute its own loss on the first position).

    Returns:
        :class:`LMHeadInputs`: ``hidden`` ``[B, L, H]`` with its graph, the head's
        ``weight`` / ``bias`` (cast, with their graph, to the dtype the head computes
        in: autocast's, float16 as float32) and the model's ``softcap``.

    Example::

        >>> cfg = transformers.GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=32)
        >>> got = lm_head_inputs(transformers.GPT2LMHeadModel(cfg), {"input_ids": torch.tensor([[1, 2, 3]])})
        >>> got.hidden.shape, got.weight.shape
        (torch.Size([1, 3, 8]), torch.Size([32, 8]))
    """
    head = _head_of(fn, who, model)
    inner = _unwrap(model)
    if model is not inner and isinstance(model, torch._dynamo.eval_frame.OptimizedModule):
        raise TypeError(f"{fn}: {who} is compiled (torch.compile); the LM head's input is taken by a forward "
                        "hook, which compiled code does not run: pass the model uncompiled (model._orig_mod)")
    if "labels" in inputs:
        raise ValueError(f"{fn}: pass the inputs without 'labels' (the labels are shifted and used by the "
                         "distillation loss, not by the model)")
    kept: list[Tensor] = []

    def keep_input(_module: nn.Module, args: tuple) -> tuple | None:
        if not args or not isinstance(args[0], Tensor) or args[0].dim() < 2:
            return None
        kept.append(args[0])
        return (args[0][..., :1, :], *args[1:])

    handle = head.register_forward_pre_hook(keep_input)
    try:
        out = model(**inputs)
    finally:
        handle.remove()
    if len(kept) != 1:
        why = (" (the model does not call the module get_output_embeddings() returns, or compiled code "
               "skipped the forward hook that takes its input)" if not kept else "")
        raise RuntimeError(f"{fn}: {who}'s LM head ran {len(kept)} times in one forward pass{why}; a causal "
                           "LM whose head runs once per forward is needed")
    hidden = kept[0]
    weight, bias = head.weight, getattr(head, "bias", None)
    if not isinstance(bias, Tensor):
        bias = None
    softcap = _check_post_head(fn, who, inner, hidden, weight, bias, _logits(out))
    dtype = _compute_dtype(weight, hidden.device)
    hidden, weight = hidden.to(dtype), weight.to(dtype)
    bias = None if bias is None else bias.to(dtype)
    return LMHeadInputs(hidden, weight, bias, softcap)


def _check_post_head(fn: str, who: str, model: nn.Module, hidden: Tensor, weight: Tensor,
                     bias: Tensor | None, logits: Tensor | None) -> float | None:
    """The model's softcap, after checking once per model that its logits are the head's
    output (soft-capped when it says so)."""
    if model in _CHECKED:
        return _CHECKED[model]
    declared = _declared_scale(model)
    if declared is not None:
        raise ValueError(f"{fn}: {who} ({type(model).__name__}) scales its logits after the LM head "
                         f"({declared}); the fused loss takes the head's own output, so it cannot "
                         "distil this model (use the loss on its full logits)")
    cap = _softcap_of(model)
    if logits is None or logits.dim() < 2 or logits.shape[-1] != weight.shape[0]:
        raise TypeError(f"{fn}: {who} ({type(model).__name__}) returned no [B, 1, V] logits; a Hugging "
                        "Face causal LM is needed")
    with torch.no_grad():
        first = hidden[..., :1, :].float()
        mine = torch.nn.functional.linear(first, weight.float(), None if bias is None else bias.float())
        if cap is not None:
            mine = cap * torch.tanh(mine / cap)
        theirs = logits.detach().float()
        if theirs.shape != mine.shape:
            raise TypeError(f"{fn}: {who} ({type(model).__name__}) returned logits of shape "
                            f"{list(theirs.shape)} for a head computing {list(mine.shape)}")
        tol = 1e-4 if theirs.dtype == torch.float32 and hidden.dtype == torch.float32 else 5e-2
        scale = mine.abs().max().clamp_min(1.0)
        if not bool(((mine - theirs).abs().max() <= tol * scale).item()):
            raise ValueError(f"{fn}: {who} ({type(model).__name__}) transforms its logits after the LM head "
                             "(they differ from lm_head(hidden states)); the fused loss cannot distil it "
                             "(use the loss on its full logits)")
    _CHECKED[model] = cap
    return cap


# --------------------------------------------------------------------------- rows and the loss


def _batch_inputs(fn: str, batch: Mapping[str, Any], ignore_index: int
                  ) -> tuple[dict[str, Any], Tensor | None, Tensor, Tensor | None]:
    """``(model inputs, unshifted labels, keep [B, L], shifted labels [B, L] or None)``."""
    from kdfast.integrations.hf import _causal_keep

    if not isinstance(batch, Mapping):
        raise TypeError(f"{fn}: batch must be a mapping (input_ids, attention_mask, labels, ...), got "
                        f"{type(batch).__name__}")
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    labels = batch.get("labels")
    ids = inputs.get("input_ids")
    ref = ids if isinstance(ids, Tensor) else inputs.get("inputs_embeds")
    if not isinstance(ref, Tensor) or ref.dim() < 2:
        raise ValueError(f"{fn}: batch needs [B, L] 'input_ids' (or [B, L, H] 'inputs_embeds')")
    if labels is not None and not isinstance(labels, Tensor):
        raise TypeError(f"{fn}: batch['labels'] must be a tensor, got {type(labels).__name__}")
    try:
        keep, shifted = _causal_keep(labels, inputs.get("attention_mask"), ref.shape[:2], ref.device,
                                     ignore_index)
    except ValueError as err:
        raise ValueError(f"{fn}: {err}") from None
    return inputs, labels, keep, shifted


def _shares(n: int, y: Tensor | None, totals: Any, device: torch.device) -> tuple[Tensor, Tensor]:
    """This batch's share of the accumulated batch's rows and labelled rows."""
    one = torch.ones((), dtype=torch.float32, device=device)
    if totals is None:
        return one, one
    rows, labelled = (torch.as_tensor(t, device=device).float() for t in totals)
    nl = n if y is not None else 0
    return n / rows.clamp_min(1), nl / labelled.clamp_min(1)


def _blended(fn_loss, ce_only, head: LMHeadInputs, hidden: Tensor, y: Tensor | None, alpha: float,
             totals: Any, return_parts: bool) -> tuple[Tensor, dict[str, Tensor]]:
    """``(1 - a) * kd * share_rows + a * ce * share_labelled`` with one call of
    ``fn_loss(alpha', labels)`` (the fused op's blend ``(1 - a') kd + a' ce`` times
    ``c = (1 - a) s_k + a s_c``, ``a' = a s_c / c``); the parts, when asked, from one more
    forward pass without gradients: ``kd = fn_loss(0, None)``, ``ce`` from the blend (or
    ``ce_only`` when ``a' < 0.1``)."""
    n = hidden.shape[0]
    if n == 0:                       # nothing to distil: a zero with a graph through every student tensor
        anchor = hidden.sum() + head.weight.sum() + (0.0 if head.bias is None else head.bias.sum())
        zero = anchor.float() * 0.0
        parts = {"kd": zero.detach()}
        if alpha > 0 and y is not None:
            parts["ce"] = zero.detach()
        return zero, parts
    s_kd, s_ce = _shares(n, y, totals, hidden.device)
    if alpha == 0 or y is None:
        kd = fn_loss(0.0, None) * s_kd
        return (1.0 - alpha) * kd, {"kd": kd.detach()}
    c = (1.0 - alpha) * s_kd + alpha * s_ce
    a_eff = float((alpha * s_ce / c).item()) if totals is not None else alpha
    blend = fn_loss(a_eff, y)
    loss = blend * c if totals is not None else blend
    parts: dict[str, Tensor] = {}
    if return_parts:
        with torch.no_grad():                   # kd directly (it is often << ce: no cancellation)
            kd = fn_loss(0.0, None)
            if a_eff >= 0.1:
                ce = (blend.detach() - (1.0 - a_eff) * kd) / a_eff
            else:                               # too small a weight to divide by
                ce = ce_only(y)
        parts = {"kd": kd * s_kd, "ce": ce * s_ce}
    return loss, parts


def _ce_only(h: Tensor, w: Tensor, b: Tensor | None, ignore_index: int, chunk_size: int | None):
    """The mean cross-entropy of the head ``(h, w, b)`` over labelled rows, chunked (a
    sparse teacher with no entries, ``alpha = 1``: only the student's products)."""
    def ce(y: Tensor) -> Tensor:
        idx = torch.full((h.shape[0], 1), -1, dtype=torch.int64, device=h.device)
        val = torch.zeros((h.shape[0], 1), dtype=torch.float32, device=h.device)
        return kdfast.fused_linear_sparse_kd_loss(h, w, idx, val, y, student_bias=b, values="probs",
                                                  alpha=1.0, ignore_index=ignore_index, chunk_size=chunk_size)
    return ce


def _check_alpha(fn: str, alpha: Any) -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= float(alpha) <= 1.0:
        raise ValueError(f"{fn}: alpha must be a float in [0, 1], got {alpha!r}")
    return float(alpha)


def causal_lm_kd_loss(student: nn.Module, teacher: nn.Module, batch: Mapping[str, Any], *,
                      temperature: float = 1.0, alpha: float = 0.0, divergence: str = "forward_kl",
                      beta: float = 0.5, softcap: float | None = None, ignore_index: int = -100,
                      chunk_size: int | None = None, totals: tuple[Any, Any] | None = None,
                      return_parts: bool = False) -> Tensor | tuple[Tensor, dict[str, Tensor]]:
    r"""The distillation loss of two Hugging Face causal LMs on ``batch`` without their
    ``[B, L, V]`` logits (see the module's documentation).

    The same value and student gradients as::

        s = student(**inputs).logits; t = teacher(**inputs).logits
        keep, y = select_rows("causal_lm", s, batch["labels"], batch["attention_mask"])
        (1 - alpha) * kdfast.kd_loss(s[keep], t[keep], temperature=..., divergence=..., softcap=...)
            + alpha * cross_entropy(s[keep], y[keep])

    (``alpha`` applies only with labels) computed by :func:`kdfast.fused_linear_kd_loss`
    on the two heads' inputs, ``chunk_size`` rows at a time.

    Args:
        student: the student ``...ForCausalLM`` (trained: its hidden states, head weight
            and bias get gradients; a tied head gives them to the input embedding).
        teacher: the teacher (same vocabulary), run in eval mode under ``torch.no_grad()``
            (put in eval mode in place); may live on another device (its hidden states
            and head are copied to the student's).
        batch: ``input_ids`` ``[B, L]``, ``attention_mask``, ``labels`` (unshifted, ``-100``
            on padding, as Hugging Face collators make them; optional) and any other
            model keyword argument (given to both models).
        temperature, alpha, divergence, beta, softcap: as in :func:`kdfast.kd_loss`.
            Models with ``final_logit_softcapping`` (Gemma) get it as ``softcap``: then
            both models must have the same one and ``softcap`` must be ``None`` or equal.
        ignore_index: the label of positions not to distil.
        chunk_size: rows per chunk (``None``: :func:`kdfast.fused_linear.auto_chunk_size`).
        totals: ``(rows, labelled)`` of the whole accumulated batch
            (:func:`kdfast.integrations.hf.count_rows` summed over its micro-batches): each
            term is then this batch's share of the accumulated batch's mean.
        return_parts: also return ``{"kd": ..., "ce": ...}`` (detached, weighted like the
            loss; ``"ce"`` only with ``alpha > 0`` and labels). With ``alpha > 0`` this costs
            one more pass over the two heads without gradients (no gradient products).

    Returns:
        The 0-dim float32 loss, or ``(loss, parts)``.

    Example::

        >>> batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
        >>> loss = causal_lm_kd_loss(student, teacher, batch, temperature=2.0, alpha=0.5)
        >>> loss.backward()
    """
    fn = "causal_lm_kd_loss"
    alpha = _check_alpha(fn, alpha)
    check_options(temperature, alpha, divergence, beta, "batchmean", ignore_index, softcap)
    inputs, _, keep, shifted = _batch_inputs(fn, batch, ignore_index)
    s = lm_head_inputs(student, inputs, fn=fn, who="the student")
    if not isinstance(teacher, nn.Module):
        raise TypeError(f"{fn}: teacher must be a Hugging Face causal LM (an nn.Module), got "
                        f"{type(teacher).__name__}")
    if teacher is student:
        raise ValueError(f"{fn}: the teacher is the student model itself; pass a separate (frozen) teacher")
    if teacher.training:
        teacher.eval()
    p = next(teacher.parameters(), None)
    t_inputs = inputs
    if p is not None and p.device != keep.device:
        t_inputs = {k: v.to(p.device) if isinstance(v, Tensor) else v for k, v in inputs.items()}
    with torch.no_grad():
        t = lm_head_inputs(teacher, t_inputs, fn=fn, who="the teacher")
    if s.weight.shape[0] != t.weight.shape[0]:
        raise ValueError(f"{fn}: the teacher has {t.weight.shape[0]} vocabulary entries but the student "
                         f"{s.weight.shape[0]}; distillation needs the same vocabulary (tokenizer) in the "
                         "same order")
    if s.softcap != t.softcap:
        raise ValueError(f"{fn}: the student soft-caps its logits at {s.softcap} (final_logit_softcapping) "
                         f"and the teacher at {t.softcap}; the fused loss applies one softcap to both")
    if s.softcap is not None:
        if softcap is not None and float(softcap) != s.softcap:
            raise ValueError(f"{fn}: softcap={softcap} but the models soft-cap their logits at {s.softcap} "
                             "(final_logit_softcapping); pass softcap=None (the models' is applied)")
        softcap = s.softcap
    dev = keep.device
    hs = s.hidden[keep]
    ht = t.hidden.to(dev)[keep] if t.hidden.device != dev else t.hidden[keep]
    wt, bt = t.weight.to(dev), None if t.bias is None else t.bias.to(dev)
    y = None if shifted is None else shifted[keep]

    def fused(a: float, labels: Tensor | None) -> Tensor:
        return kdfast.fused_linear_kd_loss(hs, s.weight, ht, wt, labels, student_bias=s.bias, teacher_bias=bt,
                                           temperature=temperature, alpha=a, divergence=divergence, beta=beta,
                                           ignore_index=ignore_index, softcap=softcap, chunk_size=chunk_size)

    loss, parts = _blended(fused, _ce_only(hs, s.weight, s.bias, ignore_index, chunk_size), s, hs, y, alpha,
                           totals, return_parts)
    return (loss, parts) if return_parts else loss


def _sparse_rows(fn: str, teacher_indices: Tensor, teacher_values: Tensor, keep: Tensor
                 ) -> tuple[Tensor, Tensor]:
    for name, x in (("teacher_indices", teacher_indices), ("teacher_values", teacher_values)):
        if not isinstance(x, Tensor):
            raise TypeError(f"{fn}: {name} must be a tensor, got {type(x).__name__}")
        if x.dim() != 3 or tuple(x.shape[:2]) != tuple(keep.shape):
            raise ValueError(f"{fn}: {name} must be [B, L, K] with the batch's [B, L] = {list(keep.shape)} "
                             f"(row i: the teacher's distribution at position i), got {list(x.shape)}")
    return teacher_indices.to(keep.device)[keep], teacher_values.to(keep.device)[keep]


def causal_lm_sparse_kd_loss(student: nn.Module, teacher_indices: Tensor, teacher_values: Tensor,
                             batch: Mapping[str, Any], *, values: str = "logprobs", temperature: float = 1.0,
                             tail: str = "renormalize", alpha: float = 0.0, ignore_index: int = -100,
                             chunk_size: int | None = None, totals: tuple[Any, Any] | None = None,
                             return_parts: bool = False) -> Tensor | tuple[Tensor, dict[str, Tensor]]:
    r"""The distillation loss of a Hugging Face causal LM against a sparse teacher on
    ``batch`` without the student's ``[B, L, V]`` logits.

    The same value and student gradients as ``(1 - alpha) * kdfast.sparse_kd_loss(
    s[keep], teacher_indices[keep], teacher_values[keep], values=..., temperature=...,
    tail=...) + alpha * cross_entropy(s[keep], y[keep])`` with ``s`` the student's
    logits and ``keep``, ``y`` as in :func:`causal_lm_kd_loss`, computed by
    :func:`kdfast.fused_linear_sparse_kd_loss`.

    Args:
        student: the student ``...ForCausalLM``.
        teacher_indices: ``[B, L, K]`` token ids (``-1``: padding); row ``[b, i]`` is the
            teacher's next-token distribution at position ``i`` (unshifted, like its
            logits), e.g. ``kdfast.topk_logits(teacher_logits, k, temperature=T)``.
        teacher_values: ``[B, L, K]`` log-probabilities (``values="logprobs"``) or
            probabilities (``"probs"``) at ``temperature``.
        batch: as in :func:`causal_lm_kd_loss`.
        values, temperature, tail: as in :func:`kdfast.sparse_kd_loss`.
        alpha, ignore_index, chunk_size, totals, return_parts: as in
            :func:`causal_lm_kd_loss`.

    Returns:
        The 0-dim float32 loss, or ``(loss, parts)``.

    Example::

        >>> with torch.no_grad():
        ...     idx, logp = kdfast.topk_logits(teacher(**inputs).logits, 16, temperature=2.0)
        >>> loss = causal_lm_sparse_kd_loss(student, idx, logp, batch, temperature=2.0, tail="residual")
    """
    fn = "causal_lm_sparse_kd_loss"
    alpha = _check_alpha(fn, alpha)
    check_sparse_kd_options(values, temperature, tail, alpha, ignore_index, "batchmean")
    inputs, _, keep, shifted = _batch_inputs(fn, batch, ignore_index)
    idx, val = _sparse_rows(fn, teacher_indices, teacher_values, keep)
    s = lm_head_inputs(student, inputs, fn=fn, who="the student")
    return _sparse_loss(fn, s, idx, val, keep, shifted, values=values, temperature=temperature, tail=tail,
                        alpha=alpha, ignore_index=ignore_index, chunk_size=chunk_size, totals=totals,
                        return_parts=return_parts)


def _sparse_loss(fn: str, s: LMHeadInputs, idx: Tensor, val: Tensor, keep: Tensor, shifted: Tensor | None, *,
                 values: str, temperature: float, tail: str, alpha: float, ignore_index: int,
                 chunk_size: int | None, totals: Any, return_parts: bool
                 ) -> Tensor | tuple[Tensor, dict[str, Tensor]]:
    """The sparse loss of the kept rows ``idx`` / ``val`` ``[n, K]`` of a student's head inputs."""
    if s.softcap is not None:
        raise ValueError(f"{fn}: the student soft-caps its logits (final_logit_softcapping={s.softcap}); "
                         "the sparse fused loss has no softcap (use the loss on its full logits)")
    hs = s.hidden[keep]
    y = None if shifted is None else shifted[keep]

    def fused(a: float, labels: Tensor | None) -> Tensor:
        return kdfast.fused_linear_sparse_kd_loss(hs, s.weight, idx, val, labels, student_bias=s.bias,
                                                  values=values, temperature=temperature, tail=tail, alpha=a,
                                                  ignore_index=ignore_index, chunk_size=chunk_size)

    loss, parts = _blended(fused, _ce_only(hs, s.weight, s.bias, ignore_index, chunk_size), s, hs, y, alpha,
                           totals, return_parts)
    return (loss, parts) if return_parts else loss
