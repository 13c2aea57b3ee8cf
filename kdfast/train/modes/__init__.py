"""Distillation modes: one object per mode says how a training step computes its loss."""

from __future__ import annotations

from typing import Any

from torch import nn

from kdfast.train.modes.base import BACKENDS, DistillMode, StepOutput, Supervised, freeze
from kdfast.train.modes.compressed import Compressed, sparsity_of
from kdfast.train.modes.consistency import Consistency
from kdfast.train.modes.domain import Adversarial, CrossDomain, GradientReversal, grad_reverse
from kdfast.train.modes.feature import Feature
from kdfast.train.modes.lifelong import Lifelong, LifelongResult, MultiHeadNet, Task, learn_tasks
from kdfast.train.modes.multi_teacher import MultiTeacher
from kdfast.train.modes.offline import Offline
from kdfast.train.modes.online import Online
from kdfast.train.modes.self_distill import Generation, SelfDistillation, born_again
from kdfast.train.modes.soft import Hard, Soft

__all__ = ["BACKENDS", "MODES", "Adversarial", "Compressed", "Consistency", "CrossDomain", "DistillMode",
           "Feature", "Generation", "GradientReversal", "Hard", "Lifelong", "LifelongResult", "MultiHeadNet",
           "MultiTeacher", "Offline", "Online", "SelfDistillation", "Soft", "StepOutput", "Supervised",
           "Task", "born_again", "freeze", "grad_reverse", "learn_tasks", "make_mode", "resolve_mode",
           "sparsity_of"]

#: Mode name -> class, for :func:`make_mode` and ``Distiller(student, "<name>", ...)``.
MODES: dict[str, type[DistillMode]] = {
    cls.name: cls for cls in (Supervised, Soft, Hard, Feature, MultiTeacher, Online, SelfDistillation,
                              Lifelong, Offline, Compressed, Consistency, Adversarial, CrossDomain)
}


def make_mode(name: str, **options: Any) -> DistillMode:
    """Build the mode called ``name`` (see :data:`MODES`) with its keyword ``options``.

    ``teacher=`` and ``teachers=`` are accepted by every mode that takes teachers.

    Example::

        >>> mode = kdfast.train.make_mode("soft", teacher=torch.nn.Linear(4, 3), temperature=2.0)
        >>> mode.name
        'soft'
    """
    if name not in MODES:
        raise ValueError(f"unknown distillation mode {name!r}; choose from {sorted(MODES)}")
    cls = MODES[name]
    if "teachers" in options and "teacher" in options:
        raise ValueError(f"mode {name!r}: pass teacher= or teachers=, not both")
    if cls is MultiTeacher and "teacher" in options:
        options["teachers"] = options.pop("teacher")
    elif cls is not MultiTeacher and "teachers" in options:
        options["teacher"] = options.pop("teachers")
    try:
        return cls(**options)
    except TypeError as err:
        if "required" in str(err) and ("teacher" in str(err)):
            raise ValueError(f"mode {name!r} needs a teacher (teacher=...)") from None
        raise


def resolve_mode(owner: str, student: Any, mode: DistillMode | str, options: dict[str, Any]) -> DistillMode:
    """The mode a trainer runs: ``mode`` itself, or :func:`make_mode` of a name with its
    ``options``; checks the student and the mode, with errors that name ``owner``."""
    if not isinstance(student, nn.Module):
        raise TypeError(f"{owner}: student must be an nn.Module, got {type(student).__name__}")
    if isinstance(mode, str):
        mode = make_mode(mode, **options)
    elif options:
        raise TypeError(f"{owner}: got mode options {sorted(options)} with a mode object; "
                        "pass them to the mode instead")
    if not isinstance(mode, DistillMode):
        raise TypeError(f"{owner}: mode must be a kdfast.train DistillMode or a mode name, "
                        f"got {type(mode).__name__}")
    if any(t is student for t in mode.teachers):
        raise ValueError(f"{owner}: the student is also the mode's frozen teacher; give separate models")
    return mode
