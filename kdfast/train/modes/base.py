"""The base of every distillation mode: frozen teachers, the loss backend, the step output."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

import kdfast
from kdfast import reference
from kdfast.train._batch import call_model, check_sequence_of_modules, unpack

__all__ = ["BACKENDS", "DistillMode", "StepOutput", "Supervised", "freeze"]

BACKENDS = ("kdfast", "reference")


@dataclass
class StepOutput:
    """What a mode's forward returns for one (micro-)batch.

    Attributes:
        loss: 0-dim tensor to call ``backward()`` on.
        logits: the student's logits on the batch's labelled (or evaluation-domain)
            inputs, ``[..., C]``, for training metrics; ``None`` when it has none.
        labels: the labels that go with ``logits`` (``None`` when unlabelled).
        parts: named components of ``loss`` (detached 0-dim tensors) for logging.
    """

    loss: torch.Tensor
    logits: torch.Tensor | None = None
    labels: torch.Tensor | None = None
    parts: dict[str, torch.Tensor] = field(default_factory=dict)


def freeze(model: nn.Module) -> nn.Module:
    """Put ``model`` in eval mode with ``requires_grad=False`` on every parameter (in place)."""
    model.eval()
    model.requires_grad_(False)
    return model


def check_real(fn: str, name: str, value: Any, *, low: float | None = None, high: float | None = None,
               low_open: bool = False, high_open: bool = False) -> float:
    """``value`` as a float, checked to be finite and inside the given bounds."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{fn}: {name} must be a real number, got {type(value).__name__}")
    value = float(value)
    bad = not math.isfinite(value)
    if low is not None:
        bad |= value <= low if low_open else value < low
    if high is not None:
        bad |= value >= high if high_open else value > high
    if bad:
        lo = "-inf" if low is None else f"{low}"
        hi = "inf" if high is None else f"{high}"
        left = "(" if low_open or low is None else "["
        right = ")" if high_open or high is None else "]"
        interval = f"{left}{lo}, {hi}{right}"
        raise ValueError(f"{fn}: {name} must be finite and in {interval}, got {value}")
    return value


def check_choice(fn: str, name: str, value: Any, choices: Sequence[str]) -> str:
    if value not in choices:
        raise ValueError(f"{fn}: {name} must be one of {tuple(choices)}, got {value!r}")
    return value


def check_classes(fn: str, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                  teacher: str = "the teacher") -> None:
    """Raise when student and teacher logits disagree on the class count (or the rows)."""
    cs, ct = student_logits.shape[-1], teacher_logits.shape[-1]
    if cs != ct:
        raise ValueError(f"{fn}: {teacher} outputs {ct} classes but the student {cs}; distillation "
                         "needs the same classes in the same order")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"{fn}: student logits {tuple(student_logits.shape)} and {teacher} logits "
                         f"{tuple(teacher_logits.shape)} differ in shape")


class DistillMode(nn.Module):
    """How one training step of a distillation mode computes its loss.

    A mode is an ``nn.Module``: what it learns besides the student (adapters, a domain
    discriminator, peers) and what it updates (an EMA teacher) are its submodules, so they
    are trained with the student (``trainable_parameters()``), moved by ``.to()`` and saved
    in ``state_dict()``. Frozen teachers given by the user are *not* submodules: they are
    moved by ``.to()`` with the mode but are not saved (they do not change).

    The contract, which :class:`kdfast.train.Distiller` follows and which an external
    trainer (a Hugging Face ``Trainer``'s ``compute_loss``, a Lightning
    ``training_step``) can follow too:

    1. ``mode.prepare(student, batch)`` once, on a first batch, *before* the optimizer
       is built: builds lazily sized parts and checks the configuration (module paths,
       class counts) against real outputs.
    2. ``out = mode(student, batch)`` per (micro-)batch; ``out.loss.backward()``.
    3. ``mode.end_step(student)`` after each ``optimizer.step()`` (EMA updates).
    4. ``mode.close()`` at the end (removes forward hooks).

    Args:
        teachers: frozen teacher model(s); each is put in eval mode with
            ``requires_grad=False`` (in place).
        backend: ``"kdfast"`` (the fused ops) or ``"reference"`` (the plain-PyTorch
            references of :mod:`kdfast.reference`, same math), for comparisons.
        ignore_index: label value of unlabelled rows.
        forward: ``forward(model, inputs) -> logits`` for models whose call is not
            ``model(inputs)`` / ``model(**inputs)``.
    """

    name: ClassVar[str] = ""
    needs_teacher: ClassVar[bool] = True

    def __init__(self, teachers: nn.Module | Sequence[nn.Module] | None = None, *,
                 backend: str = "kdfast", ignore_index: int = -100,
                 forward: Callable[[nn.Module, Any], torch.Tensor] | None = None) -> None:
        super().__init__()
        fn = type(self).__name__
        if teachers is None:
            if self.needs_teacher:
                raise ValueError(f"{fn}: the {self.name!r} mode needs a teacher (teacher=...)")
            frozen: list[nn.Module] = []
        else:
            frozen = [freeze(t) for t in check_sequence_of_modules(fn, "teacher", teachers)]
        object.__setattr__(self, "_teachers", frozen)    # not submodules: not saved, not trained
        self.backend = check_choice(fn, "backend", backend, BACKENDS)
        if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
            raise TypeError(f"{fn}: ignore_index must be an int, got {type(ignore_index).__name__}")
        self.ignore_index = ignore_index
        if forward is not None and not callable(forward):
            raise TypeError(f"{fn}: forward must be callable, got {type(forward).__name__}")
        self._forward_fn = forward

    # -- pieces shared by the modes ------------------------------------------------------

    @property
    def losses(self) -> ModuleType:
        """The loss functions of the chosen backend (``kdfast`` or ``kdfast.reference``)."""
        return kdfast if self.backend == "kdfast" else reference

    @property
    def teachers(self) -> list[nn.Module]:
        return self._teachers

    @property
    def teacher(self) -> nn.Module | None:
        """The (first) frozen teacher, ``None`` for a mode without one."""
        return self._teachers[0] if self._teachers else None

    def logits(self, model: nn.Module, inputs: Any) -> torch.Tensor:
        """``model``'s logits on ``inputs`` (with the mode's ``forward`` if given)."""
        if self._forward_fn is not None:
            return self._forward_fn(model, inputs)
        return call_model(model, inputs)

    def teacher_logits(self, inputs: Any, teacher: nn.Module | None = None) -> torch.Tensor:
        """A frozen teacher's logits on ``inputs``, without a graph (eval mode enforced)."""
        teacher = self.teacher if teacher is None else teacher
        if teacher.training:
            teacher.eval()
        with torch.no_grad():
            return self.logits(teacher, inputs)

    def unpack(self, batch: Any) -> tuple[Any, torch.Tensor | None]:
        return unpack(batch, type(self).__name__)

    def has_unlabelled(self, labels: torch.Tensor | None) -> bool:
        return labels is None or bool((labels == self.ignore_index).any())

    def cross_entropy(self, logits: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        """Mean cross-entropy over the labelled rows (0 with a zero gradient when none)."""
        if labels is None:
            return logits.sum() * 0.0
        flat, lab = logits.reshape(-1, logits.shape[-1]), labels.reshape(-1)
        counted = lab != self.ignore_index
        total = F.cross_entropy(flat.float(), lab, ignore_index=self.ignore_index, reduction="sum")
        return total / counted.sum().clamp_min(1)

    def soft_loss(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                  labels: torch.Tensor | None, *, temperature: float, alpha: float,
                  divergence: str = "forward_kl", beta: float = 0.5,
                  softcap: float | None = None, teacher: str = "the teacher"
                  ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Hinton's loss ``(1-alpha) T^2 D(p_t || q_s) + alpha CE`` with the backend's
        ``kd_loss``: one fused call when every row has a label; otherwise the divergence
        over every row plus ``alpha`` times the cross-entropy over the labelled rows, each
        averaged over its own rows."""
        check_classes(type(self).__name__, student_logits, teacher_logits, teacher)
        kw = dict(temperature=temperature, divergence=divergence, beta=beta, softcap=softcap,
                  ignore_index=self.ignore_index)
        if alpha > 0 and labels is not None and not self.has_unlabelled(labels):
            loss = self.losses.kd_loss(student_logits, teacher_logits, labels, alpha=alpha, **kw)
            return loss, {"kd": loss.detach()}
        kd = self.losses.kd_loss(student_logits, teacher_logits, **kw)
        if alpha == 0 or labels is None:
            return kd, {"kd": kd.detach()}
        ce = self.cross_entropy(student_logits, labels)
        return (1 - alpha) * kd + alpha * ce, {"kd": kd.detach(), "ce": ce.detach()}

    # -- the contract ----------------------------------------------------------------------

    def prepare(self, student: nn.Module, batch: Any) -> None:
        """Build lazily sized parts and check the configuration on a first ``batch``;
        call before building the optimizer. The default does nothing."""

    def forward(self, student: nn.Module, batch: Any) -> StepOutput:  # pragma: no cover - abstract
        raise NotImplementedError

    def end_step(self, student: nn.Module) -> None:
        """Called after every optimizer step. The default does nothing."""

    def close(self) -> None:
        """Release hooks and other per-run resources. The default does nothing."""

    def eval_teacher(self) -> nn.Module | None:
        """The model whose agreement with the student evaluation reports (the teacher)."""
        return self.teacher

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        """The mode's own parameters that train with the student (adapters, discriminators,
        peers); frozen teachers and EMA copies are excluded."""
        return (p for p in self.parameters() if p.requires_grad)

    def _apply(self, fn, recurse=True):  # moves the unregistered teachers with the mode
        for t in self._teachers:
            t._apply(fn)
        return super()._apply(fn, recurse)

    def extra_repr(self) -> str:
        return f"backend={self.backend!r}, teachers={len(self._teachers)}"


class Supervised(DistillMode):
    """No distillation: the cross-entropy on the labels (the baseline of every mode).

    Rows whose label is ``ignore_index`` contribute nothing.

    Example::

        >>> mode = kdfast.train.Supervised()
        >>> out = mode(torch.nn.Linear(4, 3), (torch.randn(8, 4), torch.randint(0, 3, (8,))))
        >>> out.loss.backward()
    """

    name = "supervised"
    needs_teacher = False

    def __init__(self, *, ignore_index: int = -100,
                 forward: Callable[[nn.Module, Any], torch.Tensor] | None = None) -> None:
        super().__init__(None, ignore_index=ignore_index, forward=forward)

    def forward(self, student: nn.Module, batch: Any) -> StepOutput:
        inputs, labels = self.unpack(batch)
        if labels is None:
            raise ValueError("Supervised: the batch has no labels")
        logits = self.logits(student, inputs)
        loss = self.cross_entropy(logits, labels)
        return StepOutput(loss, logits, labels, {"ce": loss.detach()})


def as_pairs(fn: str, pairs: Mapping[str, str] | Sequence[str | tuple[str, str]]) -> list[tuple[str, str]]:
    """Normalise module-path pairs: a mapping ``{student_path: teacher_path}``, or a
    sequence of ``(student_path, teacher_path)`` tuples or of single paths (the same
    path in both models)."""
    if isinstance(pairs, Mapping):
        items = list(pairs.items())
    elif isinstance(pairs, Sequence) and not isinstance(pairs, str):
        items = [(p, p) if isinstance(p, str) else tuple(p) for p in pairs]
    else:
        raise TypeError(f"{fn}: pairs must be a mapping {{student_path: teacher_path}} or a sequence "
                        f"of paths / (student_path, teacher_path) pairs, got {type(pairs).__name__}")
    if not items:
        raise ValueError(f"{fn}: pairs must name at least one pair of modules")
    for item in items:
        if len(item) != 2 or not all(isinstance(p, str) for p in item):
            raise TypeError(f"{fn}: each pair must be two module paths (str), got {item!r}")
    return items
