"""Self-distillation: born-again networks, a student learning from its own previous generation."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from kdfast.train._batch import call_model, move_to, unpack
from kdfast.train.checkpoint import capture_rng, restore_rng
from kdfast.train.modes.base import BACKENDS, DistillMode, Supervised, check_choice, check_real
from kdfast.train.modes.multi_teacher import MultiTeacher
from kdfast.train.modes.soft import Soft

if TYPE_CHECKING:
    from kdfast.train.distiller import FitResult

__all__ = ["Generation", "SelfDistillation", "born_again"]


class SelfDistillation(Soft):
    r"""Born-again networks (Furlanello, Lipton, Tschannen, Itti & Anandkumar,
    "Born-Again Neural Networks", ICML 2018): a student, usually of the teacher's own
    architecture, learns from the previous generation (the frozen teacher) with the
    soft-label loss of :class:`Soft`::

        loss = (1 - alpha) * T^2 * KL(softmax(t / T) || softmax(s / T)) + alpha * CE(s, y)

    The paper's born-again students are trained on the teacher's output distribution
    (the defaults here: ``temperature=1``, ``alpha=0``); its cross-entropy against the
    teacher's distribution differs from the KL above by the teacher's entropy, a constant
    of the student, so the gradients are the same. ``alpha > 0`` adds the true labels.
    :func:`born_again` trains a whole sequence of generations.

    Args:
        teacher: the previous generation (frozen in place).
        temperature, alpha, divergence, beta, softcap: see :class:`Soft`.
        backend, ignore_index, forward: see :class:`DistillMode`.

    Example::

        >>> teacher, student = torch.nn.Linear(8, 5), torch.nn.Linear(8, 5)
        >>> mode = kdfast.train.SelfDistillation(teacher)
        >>> out = mode(student, (torch.randn(16, 8), torch.randint(0, 5, (16,))))
        >>> out.loss.backward()
    """

    name = "self"

    def __init__(self, teacher: nn.Module, *, temperature: float = 1.0, alpha: float = 0.0,
                 divergence: str = "forward_kl", beta: float = 0.5, softcap: float | None = None,
                 backend: str = "kdfast", ignore_index: int = -100,
                 forward: Callable[[nn.Module, Any], torch.Tensor] | None = None) -> None:
        super().__init__(teacher, temperature=temperature, alpha=alpha, divergence=divergence, beta=beta,
                         softcap=softcap, backend=backend, ignore_index=ignore_index, forward=forward)

    def prepare(self, student: nn.Module, batch: Any) -> None:
        """Checks that the student is a separate model from its teacher (a shared parameter
        would have been frozen with the teacher)."""
        if student is self.teacher:
            raise ValueError("SelfDistillation: the student is the teacher itself; the next generation "
                             "must be a newly built model")
        frozen = {id(p) for p in self.teacher.parameters()}
        if any(id(p) in frozen for p in student.parameters()):
            raise ValueError("SelfDistillation: the student shares parameters with the teacher; the next "
                             "generation must be a newly built model")

    def loss_from_logits(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                         labels: torch.Tensor | None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return self.soft_loss(student_logits, teacher_logits, labels, temperature=self.temperature,
                              alpha=self.alpha, divergence=self.divergence, beta=self.beta,
                              softcap=self.softcap, teacher="the teacher (the previous generation)")


@dataclass
class Generation:
    """One generation of :func:`born_again`.

    Attributes:
        index: 0 for the model trained on the labels, ``g`` for the ``g``-th student.
        model: the trained model (frozen and in eval mode once a later generation has
            learnt from it).
        result: what :meth:`kdfast.train.Distiller.fit` returned for it.
    """

    index: int
    model: nn.Module
    result: FitResult


def _first_inputs(train_data: Iterable) -> Any:
    """The inputs of the first training batch, leaving every random state as it was (a
    shuffling loader draws its order from them)."""
    from kdfast.train.distiller import _loader_generators

    generators = _loader_generators(train_data)
    state = capture_rng(generators)
    first = next(iter(train_data), None)
    restore_rng(state, generators)
    if first is None:
        raise ValueError("born_again: the training data is empty")
    return unpack(first, "born_again")[0]


def _width(model: nn.Module, inputs: Any, forward: Callable[[nn.Module, Any], torch.Tensor] | None) -> int:
    """The logit width of ``model`` on ``inputs`` (eval mode, no graph, mode restored)."""
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    was = model.training
    model.eval()
    with torch.no_grad():
        inputs = move_to(inputs, device)
        width = (forward(model, inputs) if forward is not None else call_model(model, inputs)).shape[-1]
    model.train(was)
    return width


def born_again(make_student: Callable[[], nn.Module], train_data: Iterable, *, generations: int = 3,
               eval_data: Iterable | None = None, temperature: float = 1.0, alpha: float = 0.0,
               ensemble: bool = False, backend: str = "kdfast",
               forward: Callable[[nn.Module, Any], torch.Tensor] | None = None,
               **distiller_options: Any) -> list[Generation]:
    """Train a sequence of born-again generations (Furlanello et al., ICML 2018).

    Generation 0 is ``make_student()`` trained on the labels (:class:`Supervised`);
    generation ``g > 0`` is a fresh ``make_student()`` trained with
    :class:`SelfDistillation` from generation ``g - 1``. With ``ensemble=True``
    generation ``g`` learns instead from the average of all earlier generations'
    probabilities at ``T`` (an ensemble teacher: :class:`MultiTeacher` with
    ``combine="mean"`` once there are two or more); the paper's born-again ensembles
    average the generations' predictions at test time, which the returned models allow
    either way. Each generation is one
    :class:`kdfast.train.Distiller` run with ``distiller_options`` (``epochs``, ``lr``,
    ...); a ``checkpoint_dir`` gets one sub-folder ``generation<g>`` per generation.
    Every model must output the same classes (checked on the first training batch
    before each generation trains).

    Args:
        make_student: ``make_student() -> nn.Module``, called once per generation; must
            build a new model each time.
        train_data: training batches ``(inputs, labels)``, re-iterated by every generation.
        generations: how many models to train, ``>= 1`` (generation 0 included).
        eval_data: evaluation batches for every generation's :class:`FitResult`.
        temperature, alpha: of the distillation loss (see :class:`SelfDistillation`).
        ensemble: learn from the mean of all earlier generations instead of the last one.
        backend, forward: see :class:`DistillMode`.
        distiller_options: keyword arguments of :class:`kdfast.train.Distiller`.

    Returns:
        One :class:`Generation` per model, generation 0 first.

    Example::

        >>> from torch.utils.data import DataLoader, TensorDataset
        >>> x, y = torch.randn(64, 8), torch.randint(0, 3, (64,))
        >>> data = DataLoader(TensorDataset(x, y), batch_size=16)
        >>> gens = kdfast.train.born_again(lambda: torch.nn.Linear(8, 3), data, generations=2,
        ...                                progress=False)
        >>> [g.index for g in gens], gens[1].result.steps
        ([0, 1], 4)
    """
    from kdfast.train.distiller import Distiller

    fn = "born_again"
    if isinstance(make_student, nn.Module):
        raise TypeError(f"{fn}: make_student must be a function that builds a model (e.g. lambda: Net()), "
                        f"got the model {type(make_student).__name__}; every generation needs a new one")
    if not callable(make_student):
        raise TypeError(f"{fn}: make_student must be callable (() -> nn.Module), "
                        f"got {type(make_student).__name__}")
    if isinstance(generations, bool) or not isinstance(generations, int) or generations < 1:
        raise ValueError(f"{fn}: generations must be an int >= 1, got {generations!r}")
    if not isinstance(ensemble, bool):
        raise TypeError(f"{fn}: ensemble must be a bool, got {type(ensemble).__name__}")
    check_real(fn, "temperature", temperature, low=0.0, low_open=True)
    check_real(fn, "alpha", alpha, low=0.0, high=1.0)
    check_choice(fn, "backend", backend, BACKENDS)
    for key in ("mode", "teacher", "teachers"):
        if key in distiller_options:
            raise TypeError(f"{fn}: {key}= is chosen per generation; it cannot be given")
    folder = distiller_options.pop("checkpoint_dir", None)
    inputs = _first_inputs(train_data)
    done: list[Generation] = []
    width = None
    for g in range(generations):
        student = make_student()
        if not isinstance(student, nn.Module):
            raise TypeError(f"{fn}: make_student must return an nn.Module, got {type(student).__name__}")
        if any(student is earlier.model for earlier in done):
            raise ValueError(f"{fn}: make_student returned the model of an earlier generation; it must "
                             "build a new model on every call")
        w = _width(student, inputs, forward)
        if width is not None and w != width:
            raise ValueError(f"{fn}: generation {g}'s model outputs {w} classes but generation 0's {width}; "
                             "make_student must build models with the same classes every time")
        width = w
        options = dict(backend=backend, forward=forward)
        if g == 0:
            mode: DistillMode = Supervised(forward=forward)
        elif ensemble and g >= 2:
            mode = MultiTeacher([d.model for d in done], combine="mean", temperature=temperature,
                                alpha=alpha, **options)
        else:
            mode = SelfDistillation(done[-1].model, temperature=temperature, alpha=alpha, **options)
        run_options = dict(distiller_options)
        if folder is not None:
            run_options["checkpoint_dir"] = Path(os.fspath(folder)) / f"generation{g}"
        result = Distiller(student, mode, **run_options).fit(train_data, eval_data)
        done.append(Generation(g, student, result))
    return done
