"""Argument checks and reductions shared by the kernel path and the reference."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Union

import torch

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")
REDUCTIONS = ("batchmean", "sum", "none")
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def check_temperature(temperature: float, name: str = "kd_loss") -> float:
    """``temperature`` must be a finite float > 0."""
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"{name}: temperature must be a float, got {type(temperature).__name__}")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"{name}: temperature must be finite and > 0, got {temperature}")
    return float(temperature)


def check_loss_options(temperature: float, alpha: float, reduction: str, ignore_index: int,
                       name: str = "kd_loss") -> None:
    """The options every logit-distillation loss shares (kd_loss's semantics)."""
    check_temperature(temperature, name)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise TypeError(f"{name}: alpha must be a float, got {type(alpha).__name__}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"{name}: alpha must be in [0, 1], got {alpha}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"{name}: reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"{name}: ignore_index must be an int, got {type(ignore_index).__name__}")


def check_options(temperature: float, alpha: float, divergence: str, beta: float, reduction: str,
                  ignore_index: int, softcap: float | None = None) -> int:
    """Validates the scalar options; returns the divergence code used by the ops."""
    check_loss_options(temperature, alpha, reduction, ignore_index)
    if divergence not in DIVERGENCES:
        raise ValueError(f"kd_loss: divergence must be one of {DIVERGENCES}, got {divergence!r}")
    if isinstance(beta, bool) or not isinstance(beta, (int, float)):
        raise TypeError(f"kd_loss: beta must be a float, got {type(beta).__name__}")
    if divergence == "jsd" and not 0.0 < beta < 1.0:
        raise ValueError(f"kd_loss: beta must be in (0, 1) for divergence='jsd', got {beta}")
    if softcap is not None:
        if isinstance(softcap, bool) or not isinstance(softcap, (int, float)):
            raise TypeError(f"kd_loss: softcap must be a float or None, got {type(softcap).__name__}")
        if not (math.isfinite(softcap) and softcap > 0):
            raise ValueError(f"kd_loss: softcap must be finite and > 0 (or None), got {softcap}")
    return DIVERGENCES.index(divergence)


def check_logits(x: torch.Tensor, arg: str, name: str = "kd_loss") -> None:
    """``x`` must be a floating ``[..., V]`` tensor with V >= 1."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: {arg} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name}: {arg} must be float32, float16 or bfloat16 "
                        f"(float64 for testing), got {x.dtype}")
    if x.dim() < 1:
        raise ValueError(f"{name}: {arg} must have shape [..., V], got a 0-dim tensor")
    if x.shape[-1] < 1:
        raise ValueError(f"{name}: {arg} must have a vocabulary (last) dimension >= 1")


def check_labels(labels: torch.Tensor | None, student_logits: torch.Tensor, alpha: float,
                 name: str = "kd_loss") -> torch.Tensor | None:
    """``labels`` must be None (only when ``alpha == 0``) or an integer tensor of the
    leading shape of ``student_logits``; returned as int64."""
    if labels is None:
        if alpha > 0:
            raise ValueError(f"{name}: alpha > 0 needs labels, got alpha={alpha} and labels=None")
        return None
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"{name}: labels must be a torch.Tensor or None, got {type(labels).__name__}")
    if labels.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
        raise TypeError(f"{name}: labels must be an integer tensor (int64), got {labels.dtype}")
    if labels.shape != student_logits.shape[:-1]:
        raise ValueError(f"{name}: labels must have the leading shape of student_logits "
                         f"{tuple(student_logits.shape[:-1])}, got {tuple(labels.shape)}")
    if labels.device != student_logits.device:
        raise ValueError(f"{name}: labels must be on {student_logits.device}, got {labels.device}")
    return labels.long()


def check_tensors(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                  labels: torch.Tensor | None, alpha: float) -> torch.Tensor | None:
    """Validates the tensors (shapes, dtypes, devices); returns labels as int64."""
    check_logits(student_logits, "student_logits")
    check_logits(teacher_logits, "teacher_logits")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError("kd_loss: student_logits and teacher_logits must have the same shape, got "
                         f"{tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}")
    if (student_logits.dtype == torch.float64) != (teacher_logits.dtype == torch.float64):
        raise TypeError("kd_loss: float64 student_logits and teacher_logits must both be float64, got "
                        f"{student_logits.dtype} and {teacher_logits.dtype}")
    if student_logits.device != teacher_logits.device:
        raise ValueError("kd_loss: student_logits and teacher_logits must be on the same device, got "
                         f"{student_logits.device} and {teacher_logits.device}")
    return check_labels(labels, student_logits, alpha)


def check_label_values(labels: torch.Tensor, vocab: int, ignore_index: int,
                       name: str = "kd_loss") -> None:
    """Raises if a label is outside [0, vocab) and is not ignore_index (synchronises on GPU)."""
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab))
    if bool(bad.any()):
        value = int(labels[bad][0])
        raise ValueError(f"{name}: labels must be in [0, {vocab}) or equal ignore_index "
                         f"({ignore_index}), got {value}")


def reduce_rows(rows: torch.Tensor, labels: torch.Tensor | None, ignore_index: int,
                reduction: str) -> torch.Tensor:
    """Applies ``reduction`` to per-row losses (ignored rows already hold 0)."""
    if reduction == "none":
        return rows
    total = rows.sum()
    if reduction == "sum":
        return total
    return total / batchmean_count(labels, rows.numel(), ignore_index)


def batchmean_count(labels: torch.Tensor | None, rows: int, ignore_index: int) -> int | torch.Tensor:
    """The divisor of ``batchmean``: the counted rows, at least 1 (a tensor when labels
    decide it, so the count stays on the device)."""
    if labels is None:
        return max(rows, 1)
    return (labels != ignore_index).sum().clamp_(min=1)


# --- feature_loss ------------------------------------------------------------------------

FEATURE_KINDS = ("mse", "l1", "smooth_l1", "cosine")
FEATURE_REDUCTIONS = ("mean", "sum", "none")


def check_feature_options(kind: str, normalize: bool, reduction: str) -> tuple[int, int]:
    """Validates feature_loss's options; returns the (kind, reduction) codes of the ops."""
    if kind not in FEATURE_KINDS:
        raise ValueError(f"feature_loss: kind must be one of {FEATURE_KINDS}, got {kind!r}")
    if not isinstance(normalize, bool):
        raise TypeError(f"feature_loss: normalize must be a bool, got {type(normalize).__name__}")
    if reduction not in FEATURE_REDUCTIONS:
        raise ValueError(f"feature_loss: reduction must be one of {FEATURE_REDUCTIONS}, got {reduction!r}")
    return FEATURE_KINDS.index(kind), FEATURE_REDUCTIONS.index(reduction)


def check_feature_tensors(student: torch.Tensor, teacher: torch.Tensor,
                          mask: torch.Tensor | None) -> None:
    """Validates feature_loss's tensors (types, dtypes, shapes, devices)."""
    for name, x in (("student", student), ("teacher", teacher)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"feature_loss: {name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dtype not in FLOAT_DTYPES:
            raise TypeError(f"feature_loss: {name} must be float32, float16 or bfloat16 "
                            f"(float64 for testing), got {x.dtype}")
        if x.dim() < 1:
            raise ValueError(f"feature_loss: {name} must have shape [..., D], got a 0-dim tensor")
    if student.shape != teacher.shape:
        raise ValueError("feature_loss: student and teacher must have the same shape, got "
                         f"{tuple(student.shape)} and {tuple(teacher.shape)}")
    if student.shape[-1] < 1:
        raise ValueError("feature_loss: student must have a feature (last) dimension >= 1")
    if (student.dtype == torch.float64) != (teacher.dtype == torch.float64):
        raise TypeError("feature_loss: float64 student and teacher must both be float64, got "
                        f"{student.dtype} and {teacher.dtype}")
    if student.device != teacher.device:
        raise ValueError("feature_loss: student and teacher must be on the same device, got "
                         f"{student.device} and {teacher.device}")
    if mask is None:
        return
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"feature_loss: mask must be a bool torch.Tensor or None, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(f"feature_loss: mask must be a bool tensor, got {mask.dtype}")
    if mask.shape != student.shape[:-1]:
        raise ValueError("feature_loss: mask must have the leading shape of student "
                         f"{tuple(student.shape[:-1])}, got {tuple(mask.shape)}")
    if mask.device != student.device:
        raise ValueError(f"feature_loss: mask must be on {student.device}, got {mask.device}")


def feature_mean_divisor(mask: torch.Tensor | None, rows: int, dim: int,
                         kind: str) -> int | torch.Tensor:
    """The divisor of feature_loss's ``"mean"``: selected rows (at least 1) times ``D``
    for the element-wise kinds, selected rows for ``"cosine"`` (a tensor when a mask
    decides it, so the count stays on the device)."""
    per_row = 1 if kind == "cosine" else dim
    if mask is None:
        return max(rows, 1) * per_row
    return mask.sum().clamp_(min=1) * per_row


# --- attention_transfer_loss ---------------------------------------------------------------

FeatureMaps = Union[torch.Tensor, Sequence[torch.Tensor]]


def check_at_p(p: float) -> float:
    """Validates the exponent: a finite number >= 1."""
    if isinstance(p, bool) or not isinstance(p, (int, float)):
        raise TypeError(f"attention_transfer_loss: p must be a float, got {type(p).__name__}")
    if not (math.isfinite(p) and p >= 1):
        raise ValueError(f"attention_transfer_loss: p must be finite and >= 1, got {p}")
    return float(p)


def check_feature_maps(student_feat: torch.Tensor, teacher_feat: torch.Tensor,
                       where: str = "") -> None:
    """Validates one pair of feature maps (``where`` names the pair in a list)."""
    for name, x in (("student_feat", student_feat), ("teacher_feat", teacher_feat)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"attention_transfer_loss: {name}{where} must be a torch.Tensor, "
                            f"got {type(x).__name__}")
        if x.dtype not in FLOAT_DTYPES:
            raise TypeError(f"attention_transfer_loss: {name}{where} must be float32, float16 or "
                            f"bfloat16 (float64 for testing), got {x.dtype}")
        if x.dim() != 4:
            raise ValueError(f"attention_transfer_loss: {name}{where} must be a 4-D [N, C, H, W] "
                             f"feature map, got shape {tuple(x.shape)}")
        if min(x.shape) < 1:
            raise ValueError(f"attention_transfer_loss: {name}{where} must have N, C, H, W >= 1, "
                             f"got shape {tuple(x.shape)}")
    s, t = student_feat.shape, teacher_feat.shape
    if s[0] != t[0] or s[2:] != t[2:]:
        raise ValueError("attention_transfer_loss: student_feat and teacher_feat must have the same "
                         f"N, H and W (channel counts may differ){where}, got shapes {tuple(s)} "
                         f"and {tuple(t)}")
    if (student_feat.dtype == torch.float64) != (teacher_feat.dtype == torch.float64):
        raise TypeError(f"attention_transfer_loss: float64 student_feat and teacher_feat{where} must "
                        f"both be float64, got {student_feat.dtype} and {teacher_feat.dtype}")
    if student_feat.device != teacher_feat.device:
        raise ValueError(f"attention_transfer_loss: student_feat and teacher_feat{where} must be on "
                         f"the same device, got {student_feat.device} and {teacher_feat.device}")


def feature_map_pairs(student_feat: FeatureMaps, teacher_feat: FeatureMaps) -> list:
    """The (student, teacher) pairs of a call: one pair, or the pairs of two equally long
    lists / tuples."""
    s_list = isinstance(student_feat, (list, tuple))
    t_list = isinstance(teacher_feat, (list, tuple))
    if not s_list and not t_list:
        return [(student_feat, teacher_feat)]
    if s_list != t_list:
        which, other = ("student_feat", "teacher_feat") if s_list else ("teacher_feat", "student_feat")
        kind = type(student_feat if s_list else teacher_feat).__name__
        raise TypeError(f"attention_transfer_loss: {which} is a {kind} of feature maps but {other} "
                        "is not; pass two lists of the same length or two tensors")
    if len(student_feat) != len(teacher_feat):
        raise ValueError("attention_transfer_loss: student_feat and teacher_feat must hold the same "
                         f"number of feature maps, got {len(student_feat)} and {len(teacher_feat)}")
    if len(student_feat) == 0:
        raise ValueError("attention_transfer_loss: student_feat and teacher_feat must hold at least "
                         "one feature map each, got empty sequences")
    return list(zip(student_feat, teacher_feat))


# --- sparse teacher: topk_logits, sample_logits, sparse_kd_loss ----------------------------

INDEX_DTYPES = (torch.int32, torch.int64)
SPARSE_VALUES = ("logprobs", "probs")
SPARSE_TAILS = ("renormalize", "residual")
MAX_TOPK = 4096
MAX_SAMPLES = 4096
MAX_VOCAB = 2**31 - 1  # token ids fit int32 (the CUDA kernels keep them so)


def _check_count(value: int, arg: str, vocab: int | None, limit: int, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: {arg} must be an int, got {type(value).__name__}")
    if value < 1 or value > limit:
        raise ValueError(f"{name}: {arg} must be in [1, {limit}], got {value}")
    if vocab is not None and value > vocab:
        raise ValueError(f"{name}: {arg} must be <= the vocabulary size {vocab}, got {value}")
    return value


def check_index_dtype(index_dtype: torch.dtype, vocab: int, name: str) -> None:
    if index_dtype not in INDEX_DTYPES:
        raise TypeError(f"{name}: index_dtype must be torch.int32 or torch.int64, got {index_dtype}")
    if vocab > MAX_VOCAB:
        raise ValueError(f"{name}: teacher_logits must have a vocabulary (last) dimension < 2^31, "
                         f"got {vocab}")


def check_topk_args(logits: torch.Tensor, k: int, temperature: float,
                    index_dtype: torch.dtype) -> None:
    """Arguments of :func:`kdfast.topk_logits`."""
    name = "topk_logits"
    check_logits(logits, "teacher_logits", name)
    _check_count(k, "k", logits.shape[-1], MAX_TOPK, name)
    check_temperature(temperature, name)
    check_index_dtype(index_dtype, logits.shape[-1], name)


def check_sample_args(logits: torch.Tensor, num_samples: int, temperature: float,
                      generator: torch.Generator | None, index_dtype: torch.dtype) -> None:
    """Arguments of :func:`kdfast.sample_logits`."""
    name = "sample_logits"
    check_logits(logits, "teacher_logits", name)
    _check_count(num_samples, "num_samples", None, MAX_SAMPLES, name)
    check_temperature(temperature, name)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"{name}: generator must be a torch.Generator or None, "
                        f"got {type(generator).__name__}")
    check_index_dtype(index_dtype, logits.shape[-1], name)


def check_sparse_kd_options(values: str, temperature: float, tail: str, alpha: float,
                            ignore_index: int, reduction: str) -> None:
    """Scalar options of :func:`kdfast.sparse_kd_loss`."""
    name = "sparse_kd_loss"
    if values not in SPARSE_VALUES:
        raise ValueError(f"{name}: values must be one of {SPARSE_VALUES}, got {values!r}")
    if tail not in SPARSE_TAILS:
        raise ValueError(f"{name}: tail must be one of {SPARSE_TAILS}, got {tail!r}")
    check_loss_options(temperature, alpha, reduction, ignore_index, name)


def check_sparse_kd_tensors(student_logits: torch.Tensor, teacher_indices: torch.Tensor,
                            teacher_values: torch.Tensor, labels: torch.Tensor | None,
                            alpha: float) -> torch.Tensor | None:
    """Tensors of :func:`kdfast.sparse_kd_loss`; returns labels as int64."""
    name = "sparse_kd_loss"
    check_logits(student_logits, "student_logits", name)
    if not isinstance(teacher_indices, torch.Tensor):
        raise TypeError(f"{name}: teacher_indices must be a torch.Tensor, "
                        f"got {type(teacher_indices).__name__}")
    if teacher_indices.dtype not in INDEX_DTYPES:
        raise TypeError(f"{name}: teacher_indices must be int32 or int64, got {teacher_indices.dtype}")
    check_logits(teacher_values, "teacher_values", name)
    lead = tuple(student_logits.shape[:-1])
    for arg, x in (("teacher_indices", teacher_indices), ("teacher_values", teacher_values)):
        if x.dim() != student_logits.dim() or tuple(x.shape[:-1]) != lead:
            raise ValueError(f"{name}: {arg} must have shape [..., K] with the leading shape of "
                             f"student_logits {lead}, got {tuple(x.shape)}")
        if x.device != student_logits.device:
            raise ValueError(f"{name}: {arg} must be on {student_logits.device}, got {x.device}")
    if teacher_indices.shape != teacher_values.shape:
        raise ValueError(f"{name}: teacher_indices and teacher_values must have the same shape, got "
                         f"{tuple(teacher_indices.shape)} and {tuple(teacher_values.shape)}")
    if (student_logits.dtype == torch.float64) != (teacher_values.dtype == torch.float64):
        raise TypeError(f"{name}: float64 student_logits and teacher_values must both be float64, "
                        f"got {student_logits.dtype} and {teacher_values.dtype}")
    return check_labels(labels, student_logits, alpha, name)


def check_teacher_index_values(teacher_indices: torch.Tensor, vocab: int) -> None:
    """Raises if a teacher index is outside [-1, vocab) (synchronises on GPU)."""
    bad = (teacher_indices < -1) | (teacher_indices >= vocab)
    if bool(bad.any()):
        value = int(teacher_indices[bad][0])
        raise ValueError(f"sparse_kd_loss: teacher_indices must be in [0, {vocab}) or -1 "
                         f"(padding), got {value}")
