"""FitNets hint loss: a learnable regressor maps the student's features to the teacher's
width, then a feature-matching loss compares them (Romero et al., ICLR 2015)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.lazy import LazyModuleMixin
from torch.nn.parameter import UninitializedParameter

import kdfast
from kdfast._args import FEATURE_KINDS, FEATURE_REDUCTIONS, FLOAT_DTYPES

__all__ = ["HintLoss"]

HINT_KINDS = FEATURE_KINDS
HINT_REDUCTIONS = FEATURE_REDUCTIONS


def _check_dim(name: str, value: object) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"HintLoss: {name} must be an int or None, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"HintLoss: {name} must be >= 1, got {value}")
    return value


def _channel_dim(x: torch.Tensor) -> int:
    """Where the channels are: dim 1 of an ``[N, C, H, W]`` map, the last dim otherwise."""
    return 1 if x.dim() == 4 else x.dim() - 1


class HintLoss(LazyModuleMixin, nn.Module):
    r"""FitNets hint loss (Romero et al., "FitNets: Hints for Thin Deep Nets", ICLR 2015): a
    learnable regressor ``r`` maps the student's hint features to the teacher's width, and
    :func:`kdfast.feature_loss` compares ``r(student)`` with the teacher::

        loss = feature_loss(W s + b, t, kind=kind, normalize=normalize, mask=mask,
                            reduction=reduction)

    per feature vector: for ``[N, C, H, W]`` maps ``r`` is a 1x1 convolution (the same
    ``W [C_t, C_s]`` applied to every position's channel vector) and the loss compares the
    per-position channel vectors (rows of the ``permute(0, 2, 3, 1)`` view, ``D = C``); for
    ``[..., D]`` features (``[N, D]`` embeddings, ``[N, T, D]`` tokens) ``r`` is a linear
    layer on the last dim. The parameters are ``weight`` ``[teacher_dim, student_dim]`` and
    ``bias`` ``[teacher_dim]`` in both cases, initialised like ``nn.Linear`` / ``nn.Conv2d``.

    Lazy construction: with ``student_dim`` and ``teacher_dim`` given the regressor is built
    at once (on ``device`` / ``dtype``, default float32 on the CPU). With either left
    ``None`` it is built by the first forward from the input's channel counts, on the
    student's device, in float32 (float64 for float64 inputs; a float16 / bfloat16 input,
    e.g. under autocast, still gets float32 weights). Parameters created lazily do not
    exist when an optimizer is built before that first forward: run one forward first (a
    dry run, e.g. on the first batch), or pass the dims. ``.to()`` / ``.cuda()`` /
    ``.double()`` move the parameters as for any module; ``state_dict`` round trips,
    including loading a trained state into a fresh lazy ``HintLoss()``.

    The regression runs in float32 (float64 when an input is float64) whatever the dtypes
    of the input and the weights; the teacher is not detached (gradients reach it when it
    requires grad).

    Args:
        student_dim: ``C_s`` (channels of the student map, or its last dim). ``None``: from
            the first batch.
        teacher_dim: ``C_t``. ``None``: from the first batch.
        kind: ``"mse"``, ``"l1"``, ``"smooth_l1"`` (beta 1) or ``"cosine"`` (``1 - cosine
            similarity`` per vector), as in :func:`kdfast.feature_loss`.
        normalize: L2-normalise each regressed student vector and teacher vector first.
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` (as in :func:`kdfast.feature_loss`;
            ``"none"`` gives one value per vector: ``[N, H, W]`` for maps, ``[...]`` otherwise).
        device, dtype: of the parameters when the dims are given.

    Forward:
        ``student`` ``[N, C_s, H, W]`` or ``[..., C_s]``; ``teacher`` ``[N, C_t, H, W]`` or
        ``[..., C_t]`` with the same ``N, H, W`` (or leading dims), any float dtypes;
        ``mask`` optional bool ``[N, H, W]`` (or ``[...]``) selecting the vectors that count.
        4-D inputs are read as channels-first maps; any other rank as channels-last (for
        ``[N, C, D, H, W]`` volumes, move the channels last first).

    Example::

        >>> import torch, kdfast
        >>> hint = kdfast.HintLoss()                            # dims from the first batch
        >>> s = torch.randn(8, 64, 14, 14, requires_grad=True)  # student stage output
        >>> t = torch.randn(8, 256, 14, 14)                     # teacher stage output
        >>> loss = hint(s, t)                                   # builds a 64 -> 256 1x1 conv
        >>> opt = torch.optim.SGD(list(hint.parameters()) + [s], lr=0.1)  # after the dry run
        >>> loss.backward(); opt.step()
        >>> hint = kdfast.HintLoss(student_dim=384, teacher_dim=768, kind="cosine")
        >>> loss = hint(torch.randn(4, 197, 384), torch.randn(4, 197, 768))   # tokens
    """

    cls_to_become = None
    weight: torch.Tensor
    bias: torch.Tensor

    def __init__(self, student_dim: int | None = None, teacher_dim: int | None = None,
                 kind: str = "mse", normalize: bool = False, reduction: str = "mean", *,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        student_dim = _check_dim("student_dim", student_dim)
        teacher_dim = _check_dim("teacher_dim", teacher_dim)
        if kind not in HINT_KINDS:
            raise ValueError(f"HintLoss: kind must be one of {HINT_KINDS}, got {kind!r}")
        if not isinstance(normalize, bool):
            raise TypeError(f"HintLoss: normalize must be a bool, got {type(normalize).__name__}")
        if reduction not in HINT_REDUCTIONS:
            raise ValueError(f"HintLoss: reduction must be one of {HINT_REDUCTIONS}, "
                             f"got {reduction!r}")
        if dtype is not None and dtype not in FLOAT_DTYPES:
            raise TypeError(f"HintLoss: dtype must be a floating-point dtype, got {dtype}")
        self.kind = kind
        self.normalize = normalize
        self.reduction = reduction
        self._given_dims = (student_dim, teacher_dim)
        factory = {"device": device, "dtype": dtype}
        if student_dim is not None and teacher_dim is not None:
            self.weight = nn.Parameter(torch.empty(teacher_dim, student_dim, **factory))
            self.bias = nn.Parameter(torch.empty(teacher_dim, **factory))
            self.reset_parameters()
        else:
            self.weight = UninitializedParameter(**factory)
            self.bias = UninitializedParameter(**factory)

    @property
    def student_dim(self) -> int | None:
        """``C_s``, or ``None`` while the regressor is not built."""
        return self._given_dims[0] if self.has_uninitialized_params() else self.weight.shape[1]

    @property
    def teacher_dim(self) -> int | None:
        """``C_t``, or ``None`` while the regressor is not built."""
        return self._given_dims[1] if self.has_uninitialized_params() else self.weight.shape[0]

    def reset_parameters(self) -> None:
        """The default initialisation of ``nn.Linear`` and ``nn.Conv2d`` (fan-in uniform)."""
        if self.has_uninitialized_params():
            return
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        fan_in = self.weight.shape[1]
        bound = 1.0 / math.sqrt(fan_in)
        nn.init.uniform_(self.bias, -bound, bound)

    def initialize_parameters(self, student: torch.Tensor, teacher: torch.Tensor,  # type: ignore[override]
                              mask: torch.Tensor | None = None) -> None:
        """Builds the regressor from the first batch (called by the lazy-module hook)."""
        if not self.has_uninitialized_params():
            return
        self._check_inputs(student, teacher, mask, self._given_dims)
        c_s = student.shape[_channel_dim(student)]
        c_t = teacher.shape[_channel_dim(teacher)]
        dtype = torch.float64 if torch.float64 in (student.dtype, teacher.dtype) else torch.float32
        with torch.no_grad():
            self.weight.materialize((c_t, c_s), device=student.device, dtype=dtype)
            self.bias.materialize((c_t,), device=student.device, dtype=dtype)
            self.reset_parameters()

    @staticmethod
    def _check_inputs(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor | None,
                      dims: tuple[int | None, int | None]) -> None:
        """Raises for bad inputs; ``dims``: the expected ``(C_s, C_t)``, ``None`` = any."""
        for name, x in (("student", student), ("teacher", teacher)):
            if not isinstance(x, torch.Tensor):
                raise TypeError(f"HintLoss: {name} must be a torch.Tensor, got {type(x).__name__}")
            if x.dtype not in FLOAT_DTYPES:
                raise TypeError(f"HintLoss: {name} must be a floating-point tensor (float32, "
                                f"float16, bfloat16 or float64), got {x.dtype}")
            if x.dim() < 1:
                raise ValueError(f"HintLoss: {name} must have shape [N, C, H, W] or [..., D], "
                                 "got a 0-dim tensor")
        if student.dim() != teacher.dim():
            raise ValueError("HintLoss: student and teacher must have the same number of dims, got "
                             f"{tuple(student.shape)} and {tuple(teacher.shape)}")
        if student.dim() == 4:
            if student.shape[0] != teacher.shape[0]:
                raise ValueError("HintLoss: student and teacher must have the same batch size N, "
                                 f"got {student.shape[0]} and {teacher.shape[0]}")
            if student.shape[2:] != teacher.shape[2:]:
                raise ValueError("HintLoss: student and teacher maps must have the same spatial "
                                 f"size [H, W], got {list(student.shape[2:])} and "
                                 f"{list(teacher.shape[2:])} (resize or pool one of them first)")
            rows = (student.shape[0], *student.shape[2:])
        else:
            if student.shape[:-1] != teacher.shape[:-1]:
                raise ValueError("HintLoss: student and teacher must have the same leading shape "
                                 f"[...], got {tuple(student.shape)} and {tuple(teacher.shape)}")
            rows = tuple(student.shape[:-1])
        if student.device != teacher.device:
            raise ValueError("HintLoss: student and teacher must be on the same device, got "
                             f"{student.device} and {teacher.device}")
        for which, expected, x in (("student", dims[0], student), ("teacher", dims[1], teacher)):
            actual = x.shape[_channel_dim(x)]
            if expected is not None and actual != expected:
                raise ValueError(f"HintLoss: {which} has {actual} channels but {which}_dim is "
                                 f"{expected} (shape {tuple(x.shape)})")
        if mask is not None:
            if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
                got = mask.dtype if isinstance(mask, torch.Tensor) else type(mask).__name__
                raise TypeError(f"HintLoss: mask must be a bool tensor or None, got {got}")
            if tuple(mask.shape) != rows:
                raise ValueError(f"HintLoss: mask must have shape {list(rows)} (one value per "
                                 f"feature vector), got {list(mask.shape)}")
            if mask.device != student.device:
                raise ValueError(f"HintLoss: mask must be on {student.device}, got {mask.device}")

    def forward(self, student: torch.Tensor, teacher: torch.Tensor,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        # the lazy-module hook has built the regressor by now
        self._check_inputs(student, teacher, mask, (self.weight.shape[1], self.weight.shape[0]))
        wide = torch.float64 in (student.dtype, teacher.dtype, self.weight.dtype)
        dtype = torch.float64 if wide else torch.float32
        if student.dim() == 4:                     # per-position channel vectors
            student = student.permute(0, 2, 3, 1)
            teacher = teacher.permute(0, 2, 3, 1)
        if dtype == torch.float64:                 # feature_loss takes no float64/other mix
            teacher = teacher.to(dtype)
        regressed = F.linear(student.to(dtype), self.weight.to(dtype), self.bias.to(dtype))
        return kdfast.feature_loss(regressed, teacher, kind=self.kind, normalize=self.normalize,
                                   mask=mask, reduction=self.reduction)

    def extra_repr(self) -> str:
        return (f"student_dim={self.student_dim}, teacher_dim={self.teacher_dim}, "
                f"kind={self.kind!r}, normalize={self.normalize}, reduction={self.reduction!r}")
