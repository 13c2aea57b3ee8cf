"""Distillation into a compressed student: magnitude pruning and quantization-aware training."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from torch.nn.utils import prune

from kdfast.train.hooks import get_module
from kdfast.train.modes.base import check_choice, check_real
from kdfast.train.modes.soft import Soft

__all__ = ["Compressed", "sparsity_of"]

PRUNABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
            nn.ConvTranspose3d)
PRUNE_SCHEDULES = ("oneshot", "gradual")
QUANTIZE = ("qat",)
QUANT_BACKENDS = ("x86", "fbgemm", "qnnpack")


def _quantized_types() -> tuple[type, ...]:
    from torch.ao.nn import quantized as nnq

    return (nnq.Linear, nnq.Conv1d, nnq.Conv2d, nnq.Conv3d, nnq.ConvTranspose1d, nnq.ConvTranspose2d,
            nnq.ConvTranspose3d)


def _has_fake_quant(model: nn.Module) -> bool:
    from torch.ao.quantization import FakeQuantizeBase

    return any(isinstance(m, FakeQuantizeBase) for m in model.modules())


def sparsity_of(model: nn.Module) -> float:
    """The fraction of zero weights in the Linear and convolution layers of ``model``
    (pruned layers through their masks, quantized layers through their int8 weights;
    biases and other layers are not counted).

    Example::

        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
        >>> with torch.no_grad():
        ...     _ = net[0].weight.zero_()
        >>> kdfast.train.sparsity_of(net)                # 16 zeros of 24 weights
        0.6666666666666666
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"sparsity_of: model must be an nn.Module, got {type(model).__name__}")
    quantized = _quantized_types()
    zeros = total = 0
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, PRUNABLE):
                w = m.weight_orig * m.weight_mask if hasattr(m, "weight_mask") else m.weight
            elif isinstance(m, quantized):
                w = m.weight().dequantize()
            else:
                continue
            zeros += int((w == 0).sum())
            total += w.numel()
    if total == 0:
        raise ValueError("sparsity_of: the model has no Linear or convolution layers")
    return zeros / total


class Compressed(Soft):
    r"""Soft-label distillation (Hinton, Vinyals & Dean, 2015) from a frozen, uncompressed
    teacher into a student that is pruned and/or trained for int8 quantization, with
    PyTorch's own tools, so that distillation recovers what compression costs::

        loss = (1 - alpha) * T^2 * KL(softmax(t / T) || softmax(s_c / T)) + alpha * CE(s_c, y)

    where ``s_c`` are the logits of the compressed student (the :class:`Soft` loss).

    **Pruning** (Han et al., "Learning both Weights and Connections for Efficient Neural
    Networks", NeurIPS 2015): global magnitude (L1, unstructured) pruning of the weights
    of every Linear and convolution layer of the student (``exclude`` keeps some), with
    :mod:`torch.nn.utils.prune`: each weight becomes ``weight_orig * weight_mask``, and
    the ``round(s * N)`` weights of smallest magnitude over all ``N`` of them are masked.
    Masked weights stay zero (their gradient is masked too) and never grow back.

    * ``prune_schedule="oneshot"``: sparsity ``s`` at :meth:`prepare`, then fine-tuning.
    * ``"gradual"`` (Zhu & Gupta, "To prune, or not to prune", 2017): after optimizer
      step ``t`` (every ``prune_every`` steps and at ``t = n``) the sparsity is raised to
      ``s_t = s (1 - (1 - t / n)^3)``, ``n = prune_steps``: fast at first, slowly at the
      end, ``s`` from step ``n`` on.

    **Quantization-aware training** (Jacob et al., "Quantization and Training of Neural
    Networks for Efficient Integer-Arithmetic-Only Inference", CVPR 2018), eager mode of
    :mod:`torch.ao.quantization`: ``prepare_qat`` with ``get_default_qat_qconfig(quant_backend)``
    swaps Linear / convolution layers for ones whose weights are fake-quantized (int8,
    per channel) and fake-quantizes their outputs, the ranges tracked by moving averages;
    :meth:`finalize` converts the student into a real int8 model. Eager mode runs the
    student's own ``forward``, so everything between quantized layers must accept
    quantized tensors: modules such as ``nn.ReLU``, ``nn.MaxPool2d``, ``nn.Flatten`` do;
    functional arithmetic (``x + y``, ``torch.cat``) needs
    ``torch.ao.nn.quantized.FloatFunctional``. A student with its own
    ``QuantStub`` / ``DeQuantStub`` uses them; otherwise the mode quantizes the input
    (one float tensor) and dequantizes the logits with stubs of its own (saved in the
    mode's ``state_dict``) that :meth:`finalize` puts around the converted model. Fuse
    Conv-BN-ReLU blocks before (``torch.ao.quantization.fuse_modules_qat``) if wanted.

    Pruning and QAT combine: the QAT layers are pruned, and a masked weight fake-quantizes
    to exactly 0 (symmetric int8 weights). Masks and observers are buffers of the
    student, so checkpoints keep them; the mode keeps its step count.

    Args:
        teacher: the frozen, uncompressed teacher.
        sparsity: final fraction of pruned weights, in ``[0, 1)``; 0: no pruning.
        prune_schedule: ``"oneshot"`` or ``"gradual"``.
        prune_steps: ``n``, optimizer steps of the gradual schedule (gradual only).
        prune_every: prune every this many steps in the gradual schedule.
        exclude: module paths of the student whose layers (and sublayers) are not pruned.
        quantize: ``"qat"`` or ``None``.
        quant_backend: ``"x86"``, ``"fbgemm"`` or ``"qnnpack"``: the int8 kernels targeted
            (its default QAT qconfig).
        observer_steps: stop updating the quantization ranges after this many optimizer
            steps (``None``: never); until then they also follow every forward pass of the
            student, evaluation included.
        temperature, alpha, divergence, beta, softcap: of the :class:`Soft` loss.
        backend, ignore_index, forward: see :class:`DistillMode`.

    Call :meth:`prepare` (the :class:`~kdfast.train.Distiller` does) before building the
    optimizer: pruning replaces each ``weight`` parameter by ``weight_orig``. At the end,
    :meth:`finalize` returns the deployable model.

    Example::

        >>> from torch.utils.data import DataLoader, TensorDataset
        >>> data = DataLoader(TensorDataset(torch.randn(64, 8), torch.randint(0, 5, (64,))), batch_size=16)
        >>> teacher = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 5))
        >>> student = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 5))
        >>> mode = kdfast.train.Compressed(teacher, sparsity=0.5, prune_schedule="gradual", prune_steps=6,
        ...                                quantize="qat")
        >>> _ = kdfast.train.Distiller(student, mode, epochs=2, progress=False).fit(data)
        >>> int8_model = mode.finalize(student)
        >>> kdfast.train.sparsity_of(student)
        0.5
        >>> int8_model(torch.randn(3, 8)).shape
        torch.Size([3, 5])
    """

    name = "compressed"

    def __init__(self, teacher: nn.Module, *, sparsity: float = 0.0, prune_schedule: str = "oneshot",
                 prune_steps: int | None = None, prune_every: int = 1, exclude: Sequence[str] = (),
                 quantize: str | None = None, quant_backend: str = "x86", observer_steps: int | None = None,
                 temperature: float = 4.0, alpha: float = 0.1, divergence: str = "forward_kl",
                 beta: float = 0.5, softcap: float | None = None, backend: str = "kdfast",
                 ignore_index: int = -100, forward: Callable[[nn.Module, Any], torch.Tensor] | None = None
                 ) -> None:
        super().__init__(teacher, temperature=temperature, alpha=alpha, divergence=divergence, beta=beta,
                         softcap=softcap, backend=backend, ignore_index=ignore_index, forward=forward)
        fn = "Compressed"
        self.sparsity = check_real(fn, "sparsity", sparsity, low=0.0, high=1.0, high_open=True)
        self.prune_schedule = check_choice(fn, "prune_schedule", prune_schedule, PRUNE_SCHEDULES)
        if self.prune_schedule == "gradual":
            self.prune_steps = _count(fn, "prune_steps", prune_steps, "with prune_schedule='gradual'")
        elif prune_steps is not None:
            raise ValueError(f"{fn}: prune_steps is only used with prune_schedule='gradual', got "
                             f"prune_steps={prune_steps!r} with {self.prune_schedule!r}")
        else:
            self.prune_steps = None
        self.prune_every = _count(fn, "prune_every", prune_every)
        if isinstance(exclude, str) or not isinstance(exclude, Sequence) or \
                not all(isinstance(p, str) for p in exclude):
            raise TypeError(f"{fn}: exclude must be a sequence of module paths (str), got {exclude!r}")
        self.exclude = list(exclude)
        if quantize is not None:
            check_choice(fn, "quantize", quantize, QUANTIZE)
        self.quantize = quantize
        self.quant_backend = check_choice(fn, "quant_backend", quant_backend, QUANT_BACKENDS)
        if quantize is not None and quant_backend not in torch.backends.quantized.supported_engines:
            raise ValueError(f"{fn}: quant_backend {quant_backend!r} has no int8 kernels in this PyTorch "
                             f"build (supported: {torch.backends.quantized.supported_engines})")
        self.observer_steps = None if observer_steps is None else _count(fn, "observer_steps", observer_steps)
        if observer_steps is not None and quantize is None:
            raise ValueError(f"{fn}: observer_steps is only used with quantize='qat', got "
                             f"observer_steps={observer_steps!r} with quantize=None")
        if self.sparsity == 0 and quantize is None:
            raise ValueError(f"{fn}: nothing to compress: give sparsity > 0 and/or quantize='qat' "
                             "(for plain distillation use the 'soft' mode)")
        self.stubs: nn.ModuleDict | None = None
        self.register_buffer("steps", torch.zeros((), dtype=torch.int64))

    # -- pruning -----------------------------------------------------------------------------

    def prunable(self, student: nn.Module) -> list[nn.Module]:
        """The student's layers whose weights are pruned (Linear and convolutions not under
        an ``exclude`` path)."""
        for path in self.exclude:
            get_module(student, path, role="Compressed: the student")
        found = []
        for path, module in student.named_modules():
            if isinstance(module, PRUNABLE) and not any(path == e or path.startswith(e + ".")
                                                        for e in self.exclude):
                found.append(module)
        if not found:
            kept = f" outside exclude={self.exclude}" if self.exclude else ""
            raise ValueError(f"Compressed: the student has no Linear or convolution layers{kept} to prune "
                             f"(sparsity={self.sparsity})")
        return found

    def target_sparsity(self, step: int) -> float:
        """The sparsity after optimizer step ``step``: ``s`` (one-shot) or Zhu & Gupta's
        ``s (1 - (1 - t / n)^3)``."""
        if self.prune_schedule == "oneshot":
            return self.sparsity
        frac = min(step, self.prune_steps) / self.prune_steps
        return self.sparsity * (1.0 - (1.0 - frac) ** 3)

    @staticmethod
    def _prune_to(layers: list[nn.Module], fraction: float) -> None:
        """Mask the smallest-magnitude unmasked weights over ``layers`` until
        ``round(fraction * N)`` of all ``N`` are masked (masks only grow)."""
        with torch.no_grad():
            masks = [m.weight_mask for m in layers]
            total = sum(mk.numel() for mk in masks)
            want = math.floor(fraction * total + 0.5)
            have = sum(int((mk == 0).sum()) for mk in masks)
            if want > have:
                scores = torch.cat([torch.where(mk == 0, -math.inf, m.weight_orig.abs().float()).flatten()
                                    for m, mk in zip(layers, masks)])
                flat = torch.cat([mk.flatten() for mk in masks])
                flat[torch.topk(scores, want, largest=False).indices] = 0
                for mk, part in zip(masks, flat.split([mk.numel() for mk in masks])):
                    mk.copy_(part.view_as(mk))
        for m in layers:
            m.weight = m.weight_orig * m.weight_mask

    # -- quantization ------------------------------------------------------------------------------

    def _prepare_qat(self, student: nn.Module, inputs: Any) -> None:
        from torch.ao.quantization import DeQuantStub, QuantStub, get_default_qat_qconfig, prepare_qat

        own = any(isinstance(m, QuantStub) for m in student.modules())
        if not own and not (isinstance(inputs, torch.Tensor) and inputs.is_floating_point()):
            got = f"a {inputs.dtype} tensor" if isinstance(inputs, torch.Tensor) else type(inputs).__name__
            raise ValueError(f"Compressed: quantize='qat' quantizes the student's input, which must be one "
                             f"float tensor, got {got}; put torch.ao.quantization.QuantStub / DeQuantStub "
                             "in the model where quantization starts and ends")
        qconfig = get_default_qat_qconfig(self.quant_backend)
        was = student.training
        student.train()
        student.qconfig = qconfig
        prepare_qat(student, inplace=True)
        student.train(was)
        if not own:
            device = next(student.parameters()).device
            stubs = nn.ModuleDict({"quant": QuantStub(qconfig), "dequant": DeQuantStub(qconfig)})
            self.stubs = prepare_qat(stubs.train(), inplace=True).to(device)

    def logits(self, model: nn.Module, inputs: Any) -> torch.Tensor:
        """``model``'s logits; a student prepared for QAT runs between the mode's stubs."""
        if self.stubs is None or model is self.teacher or not _has_fake_quant(model):
            return super().logits(model, inputs)
        return self.stubs["dequant"](super().logits(model, self.stubs["quant"](inputs)))

    # -- the contract ------------------------------------------------------------------------------

    def prepare(self, student: nn.Module, batch: Any) -> None:
        """Prepares ``student`` in place: QAT layers (``quantize="qat"``), then the pruning
        masks (``sparsity > 0``; at ``s`` for one-shot, at the schedule's current step for
        gradual pruning). A student already prepared is left as it is."""
        inputs, _ = self.unpack(batch)
        if self.quantize is not None and not _has_fake_quant(student):
            self._prepare_qat(student, inputs)
        if self.sparsity > 0:
            layers = self.prunable(student)
            for m in layers:
                if not hasattr(m, "weight_mask"):
                    prune.identity(m, "weight")
            self._prune_to(layers, self.target_sparsity(int(self.steps)))

    def end_step(self, student: nn.Module) -> None:
        """Counts the step; raises the sparsity on the gradual schedule; stops the
        observers after ``observer_steps``."""
        self.steps += 1
        step = int(self.steps)
        if self.prune_schedule == "gradual" and step <= self.prune_steps and \
                (step % self.prune_every == 0 or step == self.prune_steps):
            self._prune_to(self.prunable(student), self.target_sparsity(step))
        if self.quantize is not None and step == self.observer_steps:
            from torch.ao.quantization import disable_observer

            student.apply(disable_observer)
            if self.stubs is not None:
                self.stubs.apply(disable_observer)

    def finalize(self, student: nn.Module) -> nn.Module:
        """The deployable model, after training: the pruning made permanent in ``student``
        (``prune.remove``: plain ``weight`` parameters with zeros), then, with QAT, a new
        int8 model for the CPU converted from a copy of it (``torch.ao.quantization.convert``,
        the mode's stubs around it if it has none of its own; ``torch.backends.quantized.engine``
        is set to ``quant_backend`` to run it). Without QAT: ``student`` itself, in eval mode.

        With ``"qnnpack"`` the int8 model computes what the fake-quantized one did, to a
        quantization step. The ``"x86"`` / ``"fbgemm"`` qconfigs fake-quantize activations
        to 7 bits (``reduce_range``, for their int8 kernels) while the converted layers
        output 8-bit tensors on the same scale: activations beyond the observed range,
        clipped in training, are not clipped by the int8 model (its accuracy stays close,
        its logits can differ on such inputs)."""
        if self.sparsity > 0:
            for m in self.prunable(student):
                if hasattr(m, "weight_mask"):
                    prune.remove(m, "weight")
        student.eval()
        if self.quantize is None:
            return student
        if not _has_fake_quant(student):
            raise RuntimeError("Compressed: the student was not prepared for QAT; call "
                               "mode.prepare(student, batch) and train it before finalize")
        from torch.ao.quantization import QuantWrapper, convert

        model = copy.deepcopy(student).cpu()              # the int8 kernels run on the CPU
        if self.stubs is not None:
            model = QuantWrapper(model)
            model.quant = copy.deepcopy(self.stubs["quant"]).cpu()
            model.dequant = copy.deepcopy(self.stubs["dequant"]).cpu()
        torch.backends.quantized.engine = self.quant_backend
        return convert(model.eval(), inplace=True)

    def extra_repr(self) -> str:
        steps = f" over {self.prune_steps} steps" if self.prune_steps else ""
        schedule = f"{self.prune_schedule!r}{steps}"
        return (f"sparsity={self.sparsity}, prune_schedule={schedule}, quantize={self.quantize!r}, "
                f"quant_backend={self.quant_backend!r}, {super().extra_repr()}")


def _count(fn: str, name: str, value: Any, when: str = "") -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        needed = f" {when}" if when else ""
        raise ValueError(f"{fn}: {name} must be an int >= 1{needed}, got {value!r}")
    return value
