"""Consistency regularisation with a mean teacher (and the two-view Pi-model)."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from kdfast.train.modes.base import DistillMode, StepOutput, check_choice, check_real

__all__ = ["Consistency"]

DISTANCES = ("mse", "kl")


def _probabilities(logits: torch.Tensor) -> torch.Tensor:
    """Softmax in float32 (float64 for float64 logits), whatever the autocast dtype."""
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    return torch.softmax(logits, dim=-1, dtype=dtype)


class Consistency(DistillMode):
    r"""Mean teacher (Tarvainen & Valpola, "Mean teachers are better role models:
    Weight-averaged consistency targets improve semi-supervised deep learning results",
    NeurIPS 2017): semi-supervised training in which the teacher is an exponential moving
    average (EMA) of the student, and the student is asked to agree with it on a
    differently perturbed copy of the same inputs::

        loss = CE(s(x + eta), y)  +  w(t) * D(s(x + eta), ema(x + eta'))
        w(t) = weight * exp(-5 (1 - min(t / rampup_steps, 1))^2)     (w = weight without ramp-up)
        ema <- d * ema + (1 - d) * student,  d = min(1 - 1 / (t + 1), ema_decay)   after each step

    ``eta``, ``eta'`` are two independent perturbations (``perturb``, by default additive
    Gaussian noise of std ``noise_std``); the cross-entropy counts the labelled rows only
    (rows labelled ``ignore_index`` and batches without labels give 0), the consistency
    every row. The EMA teacher runs in the mode's train / eval state, so dropout in the
    model is part of the noise in both branches, as in the paper; its normalisation
    statistics come from its own forward passes; only its parameters are averaged.

    ``t`` counts the optimizer steps (a buffer, saved in checkpoints). In the EMA update
    ``t`` is the step just taken (1 after the first), so during the warm-up ``d = t/(t+1)``
    makes the EMA the plain average of the initial and every later student, and the
    decay becomes ``ema_decay`` after ``1 / (1 - ema_decay) - 1`` steps (the authors'
    implementation). In the ramp-up ``t`` is the number of steps taken before this one
    (0 on the first step, where ``w = weight * exp(-5)`` with a ramp).

    ``D`` by ``distance``:

    * ``"mse"`` (the paper's choice): :func:`kdfast.feature_loss` of kind ``"mse"`` between
      the softmax probabilities, the student's with their graph and the teacher's constant;
      its ``"mean"`` averages the squared difference over rows *and classes*, i.e.
      ``sum_c (p_s - p_t)^2 / C`` per row, so useful weights are larger than for the KL
      (the paper used up to 100 with this scale);
    * ``"kl"``: :func:`kdfast.kd_loss` ``T^2 KL(softmax(ema / T) || softmax(s / T))``,
      averaged over rows.

    ``ema_decay=0`` gives the Pi-model (Laine & Aila, "Temporal Ensembling for
    Semi-Supervised Learning", ICLR 2017) in the two-view form: the target is the
    student itself on the second view, without a graph; no copy is made then and
    :meth:`eval_teacher` is ``None``.

    Args:
        weight: the consistency weight ``>= 0`` (its value after the ramp-up).
        rampup_steps: steps of the sigmoid ramp-up of the weight; 0: no ramp-up.
        ema_decay: the EMA decay in ``[0, 1)`` (the paper: 0.99, then 0.999).
        distance: ``"mse"`` or ``"kl"``.
        temperature: ``T > 0`` of ``"kl"``.
        noise_std: std ``>= 0`` of the default perturbation (floating-point tensor inputs).
        perturb: ``perturb(inputs) -> inputs`` drawing a random perturbation (data
            augmentation, token dropout ...); replaces the Gaussian noise. Called twice per
            step, once per view.
        backend, ignore_index, forward: see :class:`DistillMode`.

    Call :meth:`prepare` (the :class:`~kdfast.train.Distiller` does) before building the
    optimizer: it makes the EMA copy of the student (``mode.ema``, not trained, saved in
    the mode's ``state_dict``). Call :meth:`end_step` after every optimizer step.

    Example::

        >>> student = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 5))
        >>> mode = kdfast.train.Consistency(weight=10.0, rampup_steps=100, ema_decay=0.99)
        >>> x, y = torch.randn(16, 8), torch.randint(0, 5, (16,))
        >>> y[8:] = -100                                  # half the batch unlabelled
        >>> mode.prepare(student, (x, y))
        >>> opt = torch.optim.SGD(student.parameters(), lr=0.1)
        >>> mode(student, (x, y)).loss.backward()
        >>> opt.step()
        >>> mode.end_step(student)                        # the EMA update
        >>> int(mode.steps)
        1
    """

    name = "consistency"
    needs_teacher = False

    def __init__(self, *, weight: float = 1.0, rampup_steps: int = 0, ema_decay: float = 0.99,
                 distance: str = "mse", temperature: float = 1.0, noise_std: float = 0.1,
                 perturb: Callable[[Any], Any] | None = None, backend: str = "kdfast",
                 ignore_index: int = -100, forward: Callable[[nn.Module, Any], torch.Tensor] | None = None
                 ) -> None:
        super().__init__(None, backend=backend, ignore_index=ignore_index, forward=forward)
        fn = "Consistency"
        self.weight = check_real(fn, "weight", weight, low=0.0)
        if isinstance(rampup_steps, bool) or not isinstance(rampup_steps, int) or rampup_steps < 0:
            raise ValueError(f"{fn}: rampup_steps must be an int >= 0, got {rampup_steps!r}")
        self.rampup_steps = rampup_steps
        self.ema_decay = check_real(fn, "ema_decay", ema_decay, low=0.0, high=1.0, high_open=True)
        self.distance = check_choice(fn, "distance", distance, DISTANCES)
        self.temperature = check_real(fn, "temperature", temperature, low=0.0, low_open=True)
        self.noise_std = check_real(fn, "noise_std", noise_std, low=0.0)
        if perturb is not None and not callable(perturb):
            raise TypeError(f"{fn}: perturb must be callable, got {type(perturb).__name__}")
        self.perturb = perturb
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))
        self.register_module("ema", None)      # the EMA copy, made by prepare()

    # -- pieces ------------------------------------------------------------------------------

    def consistency_weight(self, step: int | None = None) -> float:
        """``w(t)`` at ``step`` (default: the steps taken so far)."""
        t = int(self.steps) if step is None else step
        if self.rampup_steps == 0:
            return self.weight
        phase = 1.0 - min(t / self.rampup_steps, 1.0)
        return self.weight * math.exp(-5.0 * phase * phase)

    def decay(self, step: int) -> float:
        """The EMA decay of the update after optimizer step ``step`` (1 for the first)."""
        return min(1.0 - 1.0 / (step + 1), self.ema_decay)

    def view(self, inputs: Any) -> Any:
        """One random perturbation of ``inputs``."""
        if self.perturb is not None:
            return self.perturb(inputs)
        if self.noise_std == 0:
            return inputs
        return inputs + self.noise_std * torch.randn_like(inputs)

    def consistency(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        """``D(student, teacher)`` (unweighted) for logits ``[..., C]``; the teacher's are constant."""
        if student_logits.shape != teacher_logits.shape:
            raise ValueError(f"Consistency: student logits {tuple(student_logits.shape)} and teacher "
                             f"logits {tuple(teacher_logits.shape)} differ in shape")
        teacher_logits = teacher_logits.detach()
        if self.distance == "kl":
            return self.losses.kd_loss(student_logits, teacher_logits, temperature=self.temperature)
        p_s, p_t = _probabilities(student_logits), _probabilities(teacher_logits)
        return self.losses.feature_loss(p_s, p_t.to(p_s.dtype), kind="mse")

    # -- the contract --------------------------------------------------------------------------

    def prepare(self, student: nn.Module, batch: Any) -> None:
        inputs, _ = self.unpack(batch)
        if self.perturb is None and self.noise_std > 0 and not (
                isinstance(inputs, torch.Tensor) and inputs.is_floating_point()):
            kind = type(inputs).__name__ if not isinstance(inputs, torch.Tensor) else f"{inputs.dtype} tensor"
            raise TypeError(f"Consistency: the default perturbation adds Gaussian noise to floating-point "
                            f"tensor inputs, got {kind}; pass perturb=callable(inputs) -> inputs "
                            "(or noise_std=0)")
        if self.ema_decay > 0 and self.ema is None:
            ema = copy.deepcopy(student)
            ema.requires_grad_(False)
            for p in ema.parameters():
                p.grad = None
            self.ema = ema

    def forward(self, student: nn.Module, batch: Any) -> StepOutput:
        if self.ema_decay > 0 and self.ema is None:
            raise RuntimeError("Consistency: the EMA teacher does not exist yet; call "
                               "mode.prepare(student, batch) before building the optimizer")
        inputs, labels = self.unpack(batch)
        s = self.logits(student, self.view(inputs))
        with torch.no_grad():
            t = self.logits(self.ema if self.ema is not None else student, self.view(inputs))
        ce = self.cross_entropy(s, labels)
        cons = self.consistency(s, t)
        w = self.consistency_weight()
        parts = {"ce": ce.detach(), "consistency": cons.detach(),
                 "weight": torch.tensor(w, device=cons.device)}
        return StepOutput(ce + w * cons, s, labels, parts)

    @torch.no_grad()
    def end_step(self, student: nn.Module) -> None:
        """Count the step and move the EMA teacher towards ``student``."""
        self.steps += 1
        if self.ema is None:
            return
        d = self.decay(int(self.steps))
        ema_params, params = list(self.ema.parameters()), list(student.parameters())
        if len(ema_params) != len(params):
            raise ValueError(f"Consistency: the student has {len(params)} parameters, its EMA copy "
                             f"{len(ema_params)}: pass the student given to prepare()")
        for e, p in zip(ema_params, params):
            e.mul_(d).add_(p.detach(), alpha=1.0 - d)

    def eval_teacher(self) -> nn.Module | None:
        """The EMA teacher (``None`` for the Pi-model, ``ema_decay=0``)."""
        return self.ema

    def extra_repr(self) -> str:
        return (f"weight={self.weight}, rampup_steps={self.rampup_steps}, ema_decay={self.ema_decay}, "
                f"distance={self.distance!r}, {super().extra_repr()}")
