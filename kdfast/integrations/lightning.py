"""Lightning adapters: distil a student with Lightning's ``Trainer``.

Two ways in, both thin layers over :mod:`kdfast.train`'s modes and kdfast's losses:

* :class:`DistillationModule` -- a ``LightningModule`` that wraps a plain ``nn.Module``
  student and any distillation mode of the training layer (``"soft"``, ``"feature"``,
  ``"consistency"``, ``"online"``, ...), with the optimizer and learning-rate schedule
  options of :class:`kdfast.train.Distiller`.
* :class:`DistillationCallback` -- a ``Callback`` that adds kdfast's soft-label
  distillation term to the loss of a user's *existing* ``LightningModule``, without
  changes to that module.

In both, the teacher is kept out of the optimizer and out of the module's checkpoint,
and it follows the module's device and dtype moves. Lightning 2.x (``lightning.pytorch``, or
the standalone ``pytorch_lightning`` package) is imported when this module is, not by
``import kdfast``; install it with ``pip install 'kdfast[lightning]'``.

Example::

    >>> import lightning.pytorch as pl
    >>> from torch.utils.data import DataLoader, TensorDataset
    >>> from kdfast.integrations.lightning import DistillationModule
    >>> data = DataLoader(TensorDataset(torch.randn(64, 8), torch.randint(0, 3, (64,))), batch_size=16)
    >>> teacher, student = torch.nn.Linear(8, 3), torch.nn.Linear(8, 3)
    >>> module = DistillationModule(student, "soft", teacher=teacher, temperature=4.0, lr=1e-2)
    >>> trainer = pl.Trainer(max_steps=4, accelerator="cpu", logger=False, enable_checkpointing=False,
    ...                      enable_progress_bar=False, enable_model_summary=False)
    >>> trainer.fit(module, data, data)
    >>> trainer.global_step, sorted(k for k in trainer.callback_metrics if k.startswith("val/"))[:3]
    (4, ['val/accuracy', 'val/agreement', 'val/ece'])
"""

from __future__ import annotations

import functools
import importlib
import math
import random
import sys
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from kdfast.integrations import require
from kdfast.train._batch import batch_size, logits_of, move_to, paired, unpack
from kdfast.train.metrics import MetricTracker
from kdfast.train.modes import DistillMode, Soft, StepOutput, resolve_mode
from kdfast.train.optim import build_optimizer, build_scheduler, check_specs

__all__ = ["DistillationCallback", "DistillationModule", "lightning_module"]



def lightning_module() -> Any:
    """The ``lightning.pytorch`` package, or ``pytorch_lightning`` when only that is
    installed; an ``ImportError`` naming ``pip install 'kdfast[lightning]'`` otherwise."""
    try:
        return importlib.import_module("lightning.pytorch")
    except ImportError:
        pass
    try:
        return importlib.import_module("pytorch_lightning")
    except ImportError:
        return require("lightning.pytorch", extra="lightning", feature="kdfast.integrations.lightning")


pl = lightning_module()
is_overridden = importlib.import_module(f"{pl.__name__}.utilities.model_helpers").is_overridden


# ----------------------------------------------------------------------------------- checks


def _real(cls: str, name: str, value: Any, *, low: float, allow_low: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or value < low or (value == low and not allow_low):
        bound = f">= {low}" if allow_low else f"> {low}"
        raise ValueError(f"{cls}: {name} must be a finite number {bound}, got {value!r}")
    return float(value)


def _int(cls: str, name: str, value: Any, *, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{cls}: {name} must be an int >= {minimum}, got {value!r}")
    return value


def _module_device(model: nn.Module) -> torch.device | None:
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return None


def _rng_state() -> dict[str, Any]:
    """The global random states (torch CPU and CUDA, Python, NumPy when loaded) in types
    that ``torch.load(weights_only=True)`` reads: tensors, ints, floats, strings, tuples."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if "numpy" in sys.modules:
        kind, keys, pos, has_gauss, gauss = sys.modules["numpy"].random.get_state()
        state["numpy"] = (kind, torch.from_numpy(keys.astype("int64")), int(pos), int(has_gauss),
                          float(gauss))
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state:
        import numpy

        kind, keys, pos, has_gauss, gauss = state["numpy"]
        numpy.random.set_state((kind, keys.numpy().astype(numpy.uint32), pos, has_gauss, gauss))


def _leaves(data: Any) -> list[Any]:
    """The loaders of ``data``: one loader, or a mapping / list of them (Lightning combines
    those into batches of the same structure)."""
    if isinstance(data, Mapping):
        return [leaf for v in data.values() for leaf in _leaves(v)]
    if isinstance(data, (list, tuple)):
        return [leaf for v in data for leaf in _leaves(v)]
    if isinstance(data, paired):
        return _leaves(data.source) + _leaves(data.target)
    return [data]


def _first_of(data: Any) -> Any:
    if isinstance(data, Mapping):
        return {k: _first_of(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return type(data)(_first_of(v) for v in data)
    batch = next(iter(data), None)
    if batch is None:
        raise ValueError("DistillationModule: the training data is empty")
    return batch


def _first_batch(trainer: Any) -> Any:
    """The first batch of the trainer's training data (of each loader, for a mapping or a
    list of loaders), drawn without moving any random state: the global CPU generator and
    the loaders' own generators are restored afterwards."""
    loader = None
    source = getattr(getattr(trainer, "fit_loop", None), "_data_source", None)
    if source is not None and source.is_defined():
        loader = source.dataloader()               # the loader given to fit(), or train_dataloader()
    elif getattr(trainer, "datamodule", None) is not None:
        loader = trainer.datamodule.train_dataloader()
    if loader is None:
        raise RuntimeError("DistillationModule: cannot find the training data to prepare the mode on; "
                           "pass example_batch= to DistillationModule or call module.prepare(batch)")
    generators: list[torch.Generator] = []
    for leaf in _leaves(loader):
        sampler = getattr(leaf, "sampler", None)
        for g in (getattr(leaf, "generator", None), getattr(sampler, "generator", None)):
            if isinstance(g, torch.Generator) and all(g is not h for h in generators):
                generators.append(g)
    states = [g.get_state() for g in generators]
    with torch.random.fork_rng(devices=[]):
        batch = _first_of(loader)
    for g, state in zip(generators, states):
        g.set_state(state)
    return batch


# ------------------------------------------------------------------------- the module wrapper


class DistillationModule(pl.LightningModule):
    r"""A ``LightningModule`` that trains ``student`` with a kdfast distillation mode.

    ``training_step`` is ``mode(student, batch)`` (a :class:`~kdfast.train.StepOutput`);
    its loss is what Lightning back-propagates and each named part is logged beside it
    (``train/loss``, ``train/kd``, ``train/ce``, ..., per step and per epoch).
    ``validation_step`` streams the student's logits (and the mode's evaluation teacher's)
    into a :class:`~kdfast.train.metrics.MetricTracker` and logs ``val/accuracy``,
    ``val/nll``, ``val/ece``, ``val/f1``, ``val/agreement``... at the epoch's end.

    The contract of :class:`~kdfast.train.DistillMode` is followed as Lightning allows:

    * ``mode.prepare(student, batch)`` runs in ``setup`` (before Lightning restores a
      checkpoint and builds the optimizer) on ``example_batch`` or else the first batch of
      the training data, so lazily built parts (hint regressors, a discriminator, an EMA
      copy) exist when the checkpoint is loaded and are in the optimizer. With
      ``example_batch`` it already runs in the constructor, which is what
      ``load_from_checkpoint`` needs for such modes.
    * ``mode.end_step(student)`` runs after every optimizer step (``optimizer_step``,
      which Lightning calls once per ``accumulate_grad_batches`` batches).
    * ``mode.close()`` runs in ``teardown``.

    The student and the mode are submodules: the student's weights and the mode's own
    state (regressors, peers, EMA teacher, counters) are in ``state_dict()`` and so in
    Lightning's checkpoints; frozen teachers are not (they are held by the mode outside
    its registered submodules), yet Lightning's device and dtype moves of this module
    move them too. The optimizer trains the student's parameters and
    ``mode.trainable_parameters()``, never a frozen teacher.

    Resuming: ``trainer.fit(module, ..., ckpt_path="last")`` (with a ``ModelCheckpoint``)
    restores the student, the mode's state, optimizer, schedule and counters, and (one
    process, ``restore_rng``) the global random states, which Lightning itself does not
    save, so input noise and dropout go on as they would have. Lightning starts a plain
    ``DataLoader`` again at the epoch's beginning, so the continuation is step for step
    the uninterrupted run's when the checkpoint is on an epoch's last step of an
    unshuffled loader, or anywhere with a loader that has ``state_dict`` /
    ``load_state_dict`` (such as torchdata's ``StatefulDataLoader``); with random
    numbers drawn during training, the loader also needs its own ``generator=`` (every
    ``DataLoader`` iterator draws a seed, from the global generator otherwise). Else the
    continuation is valid but not the same.

    Several processes (``strategy="ddp"``): each process's loss is the mean over its own
    batch and DDP averages the gradients, so ``N`` processes with batch ``b`` take the
    steps of one process with batch ``N * b`` on the same samples when every process's
    batch has as many rows (samples with a label) as the others (equal batch sizes, no
    ``-100`` labels); the logged ``train/...`` values are the mean over the processes
    (``sync_dist``). Lightning gives the training loader a ``DistributedSampler`` that
    shuffles (seed 0, or ``seed_everything``'s) even when the loader did not, unless
    ``Trainer(use_distributed_sampler=False)``. Each process evaluates its share of the
    validation data and the metrics are computed from the totals of all shares
    (:meth:`~kdfast.train.metrics.MetricTracker.all_reduce`), which are those of the
    whole set when its size is a multiple of the process count (else Lightning's
    distributed sampler repeats a few samples to even the shares out).

    Args:
        student: the model to train; ``student(inputs)`` (``student(**inputs)`` for a
            mapping) gives logits ``[..., C]``.
        mode: a :class:`~kdfast.train.DistillMode`, or a mode name of
            :data:`kdfast.train.MODES` built with ``mode_options`` by
            :func:`kdfast.train.make_mode` (e.g. ``teacher=``, ``temperature=``).
        optimizer: ``"adamw"`` (default), ``"adam"``, ``"sgd"`` (momentum 0.9) or
            ``callable(param_groups) -> Optimizer``; as in :class:`kdfast.train.Distiller`
            the groups put weight decay on parameters of two or more dimensions only.
        lr, weight_decay: of the built-in optimizers.
        scheduler: ``"constant"`` (default), ``"cosine"`` or ``"linear"`` (to 0 at the end
            of the run, after ``warmup_steps`` of linear warm-up), or
            ``callable(optimizer) -> scheduler``; stepped once per optimizer step.
        warmup_steps: linear warm-up steps of the built-in schedules.
        total_steps: optimizer steps of the whole run for the schedules (default: the
            trainer's ``estimated_stepping_batches``).
        example_batch: a batch (as the loaders yield it) to prepare the mode on now;
            default: the first training batch, in ``setup``.
        log_parts: also log each named part of the loss.
        restore_rng: save the random states (torch CPU and CUDA, Python, NumPy) in each
            checkpoint and restore them when a single-process ``fit`` resumes from it.
        mode_options: options of the mode when ``mode`` is a name.

    Batches: ``(inputs, labels)`` tuples or dicts with ``"inputs"`` / ``"labels"`` (see
    :mod:`kdfast.train`), labels ``-100`` for unlabelled rows. The domain modes
    (``"adversarial"``, ``"cross_domain"``) train on ``{"source": batch, "target": batch}``:
    give ``fit`` a :func:`kdfast.train.paired` loader or Lightning's own mapping of loaders
    ``{"source": source_loader, "target": target_loader}``; validation batches are plain.

    Example::

        >>> import lightning.pytorch as pl
        >>> from torch import nn
        >>> from torch.utils.data import DataLoader, TensorDataset
        >>> from kdfast.integrations.lightning import DistillationModule
        >>> data = DataLoader(TensorDataset(torch.randn(64, 8), torch.randint(0, 3, (64,))), batch_size=16)
        >>> teacher = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 3))
        >>> student = nn.Sequential(nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 3))
        >>> module = DistillationModule(student, "feature", teacher=teacher, pairs={"1": "1"},
        ...                             lr=2e-3, scheduler="cosine", warmup_steps=2)
        >>> trainer = pl.Trainer(max_steps=6, accelerator="cpu", logger=False, enable_checkpointing=False,
        ...                      enable_progress_bar=False, enable_model_summary=False)
        >>> trainer.fit(module, data)
        >>> [k for k in module.state_dict() if not k.startswith("student.")]   # no teacher weights
        ['mode.adapters.0.weight', 'mode.adapters.0.bias']
    """

    def __init__(self, student: nn.Module, mode: DistillMode | str, *,
                 optimizer: str | Callable[[list[dict[str, Any]]], torch.optim.Optimizer] = "adamw",
                 lr: float = 1e-3, weight_decay: float = 0.0,
                 scheduler: str | Callable[[torch.optim.Optimizer], Any] | None = "constant",
                 warmup_steps: int = 0, total_steps: int | None = None, example_batch: Any = None,
                 log_parts: bool = True, restore_rng: bool = True, **mode_options: Any) -> None:
        super().__init__()
        cls = "DistillationModule"
        mode = resolve_mode(cls, student, mode, mode_options)
        check_specs(cls, optimizer, scheduler)
        self.student = student
        self.mode = mode
        self.optimizer_spec = optimizer
        self.lr = _real(cls, "lr", lr, low=0.0, allow_low=False)
        self.weight_decay = _real(cls, "weight_decay", weight_decay, low=0.0, allow_low=True)
        self.scheduler_spec = scheduler
        self.warmup_steps = _int(cls, "warmup_steps", warmup_steps, minimum=0)
        self.total_steps = None if total_steps is None else _int(cls, "total_steps", total_steps, minimum=1)
        if not isinstance(log_parts, bool):
            raise TypeError(f"{cls}: log_parts must be a bool, got {type(log_parts).__name__}")
        self.log_parts = log_parts
        if not isinstance(restore_rng, bool):
            raise TypeError(f"{cls}: restore_rng must be a bool, got {type(restore_rng).__name__}")
        self.restore_rng = restore_rng
        # the plain settings only (load_from_checkpoint and loggers); never a model
        self.save_hyperparameters({
            "lr": self.lr, "weight_decay": self.weight_decay, "warmup_steps": self.warmup_steps,
            "total_steps": self.total_steps, "log_parts": log_parts, "restore_rng": restore_rng,
            **({"optimizer": optimizer} if isinstance(optimizer, str) else {}),
            **({"scheduler": scheduler} if scheduler is None or isinstance(scheduler, str) else {})})
        self._prepared = False
        self._tracker: MetricTracker | None = None
        if example_batch is not None:
            self.prepare(example_batch)

    # -- the mode's contract -------------------------------------------------------------------

    def prepare(self, batch: Any) -> None:
        """Run ``mode.prepare(student, batch)`` once (builds lazily sized parts), in training
        mode and without gradients; ``batch`` is moved to the student's device."""
        if self._prepared:
            return
        device = _module_device(self.student)
        batch = move_to(batch, device)
        was_training = self.student.training
        self.student.train()
        try:
            self.mode.prepare(self.student, batch)
        finally:
            self.student.train(was_training)
        self._prepared = True

    def setup(self, stage: str) -> None:
        if stage == "fit" and not self._prepared:
            self.prepare(_first_batch(self.trainer))

    def teardown(self, stage: str) -> None:
        if stage == "fit":
            self.mode.close()

    def trainable_parameters(self) -> list[nn.Parameter]:
        """What the optimizer trains: the student's parameters and the mode's own trainable
        ones (``mode.trainable_parameters()``), each once, never a frozen teacher's."""
        teacher_ids = {id(p) for t in self.mode.teachers for p in t.parameters()}
        seen: set[int] = set()
        params = []
        for p in list(self.student.parameters()) + list(self.mode.trainable_parameters()):
            if p.requires_grad and id(p) not in seen and id(p) not in teacher_ids:
                seen.add(id(p))
                params.append(p)
        return params

    # -- optimisation ---------------------------------------------------------------------------

    def configure_optimizers(self) -> Any:
        if not self._prepared:
            raise RuntimeError("DistillationModule: the mode was not prepared before the optimizer was "
                               "built; pass example_batch= or call module.prepare(batch) first")
        params = self.trainable_parameters()
        if not params:
            raise ValueError("DistillationModule: nothing to train (the student and the mode have no "
                             "parameter with requires_grad=True)")
        opt = build_optimizer(params, self.optimizer_spec, lr=self.lr, weight_decay=self.weight_decay)
        needs_total = self.scheduler_spec in ("cosine", "linear") or (self.warmup_steps and
                                                                       not callable(self.scheduler_spec))
        scheduler = build_scheduler(opt, self.scheduler_spec, warmup_steps=self.warmup_steps,
                                    total_steps=self._run_steps() if needs_total else 1)
        if scheduler is None:
            return opt
        return {"optimizer": opt,
                "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1}}

    def _run_steps(self) -> int:
        if self.total_steps is not None:
            return self.total_steps
        steps = self.trainer.estimated_stepping_batches
        if not math.isfinite(steps):
            raise ValueError("DistillationModule: the trainer cannot tell the run's length (no max_steps "
                             "and no max_epochs with sized data); pass total_steps= for the schedule")
        return max(int(steps), 1)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.restore_rng:
            checkpoint["kdfast_rng"] = _rng_state()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # only when a single-process fit resumes (not on load_from_checkpoint; with several
        # processes the checkpoint holds the first one's states, which the others must not take)
        trainer = self._trainer
        state = checkpoint.get("kdfast_rng")
        if self.restore_rng and state is not None and trainer is not None and trainer.world_size == 1 \
                and trainer.state.fn == "fit":
            _set_rng_state(state)

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        self.mode.end_step(self.student)

    # -- steps ----------------------------------------------------------------------------------

    def forward(self, inputs: Any) -> torch.Tensor:
        """The student's logits on ``inputs`` (as the mode calls it)."""
        return self.mode.logits(self.student, inputs)

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> torch.Tensor:
        """The student's logits on the batch's inputs."""
        return self(unpack(batch, "DistillationModule.predict_step")[0])

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        out: StepOutput = self.mode(self.student, batch)
        n = _batch_rows(batch)
        # sync_dist: with several processes the logged values are the mean over the processes
        # (each one's own is only its share of the batch); a no-op in one process
        self.log("train/loss", out.loss.detach(), on_step=True, on_epoch=True, prog_bar=True, batch_size=n,
                 sync_dist=True)
        if self.log_parts:
            for name, value in out.parts.items():
                self.log(f"train/{name}", value.float(), on_step=True, on_epoch=True, batch_size=n,
                         sync_dist=True)
        return out.loss

    def on_validation_epoch_start(self) -> None:
        self._tracker = None

    def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        inputs, labels = unpack(batch, "DistillationModule.validation_step")
        logits = self.mode.logits(self.student, inputs)
        teacher = self.mode.eval_teacher()
        teacher_logits = None
        if teacher is not None:
            was = teacher.training
            teacher.eval()
            teacher_logits = self.mode.logits(teacher, inputs)
            teacher.train(was)
        if labels is None and teacher_logits is None:
            return
        if self._tracker is None:
            c = logits.shape[-1]
            self._tracker = MetricTracker(c, topk=(5,) if c > 5 else (), ignore_index=self.mode.ignore_index)
        self._tracker.update(logits, labels, teacher_logits)

    def on_validation_epoch_end(self) -> None:
        if self._tracker is None:
            return
        self._tracker.all_reduce()      # several processes: the totals of every share (no-op alone)
        metrics = self._tracker.compute()
        self._tracker = None
        self.log_dict({f"val/{k}": float(v) for k, v in metrics.items()})

    def extra_repr(self) -> str:
        return f"optimizer={self.optimizer_spec!r}, lr={self.lr}, scheduler={self.scheduler_spec!r}"


def _batch_rows(batch: Any) -> int | None:
    """Rows of a training batch for Lightning's epoch averages (``None`` when unknown)."""
    try:
        if isinstance(batch, Mapping) and "inputs" not in batch:        # paired domain batches
            return sum(_batch_rows(b) or 0 for b in batch.values()) or None
        return batch_size(unpack(batch)[0])
    except (TypeError, ValueError):
        return None


# ------------------------------------------------------------------------------- the callback


def _call_as_captured(model: nn.Module, call: tuple[tuple, dict]) -> torch.Tensor:
    """``model`` called with the positional and keyword arguments a forward hook captured."""
    args, kwargs = call
    return logits_of(model(*args, **kwargs), "DistillationCallback: the teacher")


class DistillationCallback(pl.Callback):
    r"""Adds kdfast's soft-label distillation to an existing ``LightningModule``'s loss.

    The module keeps its own ``training_step`` and loss (say, the cross-entropy on the
    labels). During each training step the callback reads the logits of the module (or
    of its submodule ``module``) with a forward hook, runs the frozen ``teacher`` on the
    same inputs, and returns instead::

        loss = alpha * task_loss + (1 - alpha) * T^2 * D(softmax(t / T) || softmax(s / T))

    where ``task_loss`` is what ``training_step`` returned (a tensor, or the ``"loss"`` of
    a dict; other keys are kept) and the divergence term is
    :meth:`kdfast.train.Soft.loss_from_logits` (:func:`kdfast.kd_loss`) over every row.
    When the hooked module runs several times in one step, the terms are averaged.
    Logged: ``distill/kd`` (the divergence term), ``distill/task_loss`` and
    ``distill/loss`` (per step and epoch). During validation it logs ``distill/val_agreement``
    (the share of rows where student and teacher agree on the argmax).

    The teacher is held by the callback, never by the module: it is not in the optimizer
    or the module's checkpoint; it is put in eval mode with ``requires_grad=False`` and
    moved to the module's device and floating dtype whenever they differ from its own.
    The callback's ``state_dict`` holds its settings only. ``training_step`` is wrapped in
    ``setup`` and restored in ``teardown``; the module needs automatic optimisation
    (Lightning's default).

    Args:
        teacher: the frozen teacher; it is called as the hooked module was (same positional
            and keyword arguments) and must give logits of the same shape.
        temperature: ``T > 0``.
        alpha: weight of the module's own loss, in ``[0, 1]``.
        divergence: ``"forward_kl"``, ``"reverse_kl"`` or ``"jsd"`` (see ``kd_loss``).
        beta: the JSD mixture weight.
        softcap: logit soft-capping as in ``kd_loss`` (``None``: none).
        module: dotted path of the submodule whose output is the logits (e.g. ``"net"``),
            ``""`` (default) for the ``LightningModule`` itself.
        backend: ``"kdfast"`` or ``"reference"`` (plain PyTorch, for comparisons).

    Example::

        >>> import lightning.pytorch as pl
        >>> import torch.nn.functional as F
        >>> from torch.utils.data import DataLoader, TensorDataset
        >>> from kdfast.integrations.lightning import DistillationCallback
        >>> class LitClassifier(pl.LightningModule):        # the user's module, unchanged
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.net = torch.nn.Linear(8, 3)
        ...     def training_step(self, batch, batch_idx):
        ...         x, y = batch
        ...         return F.cross_entropy(self.net(x), y)
        ...     def configure_optimizers(self):
        ...         return torch.optim.Adam(self.parameters(), lr=1e-2)
        >>> data = DataLoader(TensorDataset(torch.randn(64, 8), torch.randint(0, 3, (64,))), batch_size=16)
        >>> kd = DistillationCallback(torch.nn.Linear(8, 3), temperature=4.0, alpha=0.5, module="net")
        >>> trainer = pl.Trainer(max_steps=4, accelerator="cpu", callbacks=[kd], logger=False,
        ...                      enable_checkpointing=False, enable_progress_bar=False,
        ...                      enable_model_summary=False)
        >>> trainer.fit(LitClassifier(), data)
        >>> sorted(k for k in trainer.callback_metrics if k.startswith("distill/"))[:3]
        ['distill/kd', 'distill/kd_epoch', 'distill/kd_step']
    """

    def __init__(self, teacher: nn.Module, *, temperature: float = 4.0, alpha: float = 0.5,
                 divergence: str = "forward_kl", beta: float = 0.5, softcap: float | None = None,
                 module: str = "", backend: str = "kdfast") -> None:
        super().__init__()
        cls = "DistillationCallback"
        if not isinstance(teacher, nn.Module):
            raise TypeError(f"{cls}: teacher must be an nn.Module, got {type(teacher).__name__}")
        if not isinstance(module, str):
            raise TypeError(f"{cls}: module must be a dotted submodule path (str), "
                            f"got {type(module).__name__}")
        self.module_path = module
        # the kd term is Soft's loss with alpha=0 (the module's loss plays the hard-label part)
        self._soft = Soft(teacher, temperature=temperature, alpha=0.0, divergence=divergence, beta=beta,
                          softcap=softcap, backend=backend, forward=_call_as_captured)
        self.alpha = _real(cls, "alpha", alpha, low=0.0, allow_low=True)
        if self.alpha > 1:
            raise ValueError(f"{cls}: alpha must be in [0, 1], got {alpha!r}")
        self.teacher = teacher
        self._pl_module: Any = None
        self._original_step: Any = None
        self._original_val_step: Any = None
        self._hook: Any = None
        self._capturing = False
        self._captured: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._agree = torch.zeros(2, dtype=torch.long)

    @property
    def temperature(self) -> float:
        return self._soft.temperature

    @property
    def divergence(self) -> str:
        return self._soft.divergence

    @property
    def state_key(self) -> str:
        return self._generate_state_key(module=self.module_path)

    def state_dict(self) -> dict[str, Any]:
        """The settings only (the teacher is not saved)."""
        return {"temperature": self.temperature, "alpha": self.alpha, "divergence": self.divergence,
                "beta": self._soft.beta, "softcap": self._soft.softcap, "module": self.module_path}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Accepts the settings of a checkpoint; a run resumed with other settings goes on
        with the callback's current ones."""

    # -- placement and capture -----------------------------------------------------------------

    def _place_teacher(self, pl_module: Any) -> None:
        device = pl_module.device
        dtype = pl_module.dtype if isinstance(pl_module.dtype, torch.dtype) and \
            pl_module.dtype.is_floating_point else None
        ref = next(iter(self.teacher.parameters()), None)
        if ref is None:
            ref = next(iter(self.teacher.buffers()), None)
        if ref is not None and (ref.device != device or (dtype is not None and ref.dtype != dtype)):
            self.teacher.to(device=device, dtype=dtype)

    def _forward_hook(self, mod: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        if not self._capturing:
            return
        student_logits = logits_of(output, f"DistillationCallback: the module {self.module_path!r}")
        self._place_teacher(self._pl_module)
        teacher_logits = self._soft.teacher_logits((args, kwargs))
        self._captured.append((student_logits, teacher_logits))

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage != "fit":
            return
        cls = "DistillationCallback"
        if not pl_module.automatic_optimization:
            raise ValueError(f"{cls}: the module uses manual optimization (automatic_optimization=False); "
                             "the callback adds its term to the loss training_step returns, which needs "
                             "automatic optimization")
        try:
            target = pl_module.get_submodule(self.module_path) if self.module_path else pl_module
        except AttributeError as err:
            raise ValueError(f"{cls}: module={self.module_path!r} names no submodule of "
                             f"{type(pl_module).__name__} ({err})") from None
        owned = {id(p) for p in pl_module.parameters()}
        if any(id(p) in owned for p in self.teacher.parameters()):
            raise ValueError(f"{cls}: the teacher shares parameters with the module being trained; the "
                             "teacher must be a separate, frozen model (keep it out of the LightningModule)")
        if self._pl_module is not None:           # a run that ended without teardown
            self._restore()
        self._soft.teacher.eval()
        self._soft.teacher.requires_grad_(False)
        self._pl_module = pl_module
        self._hook = target.register_forward_hook(self._forward_hook, with_kwargs=True)
        self._original_step = pl_module.__dict__.get("training_step")
        self._original_val_step = pl_module.__dict__.get("validation_step")
        step, val_step = pl_module.training_step, pl_module.validation_step

        @functools.wraps(step)
        def training_step(*args: Any, **kwargs: Any) -> Any:
            self._captured.clear()
            self._capturing = True
            try:
                result = step(*args, **kwargs)
            finally:
                self._capturing = False
            captured, self._captured = self._captured, []
            return self._combine(pl_module, result, captured)

        @functools.wraps(val_step)
        def validation_step(*args: Any, **kwargs: Any) -> Any:
            self._captured.clear()
            self._capturing = True
            try:
                result = val_step(*args, **kwargs)
            finally:
                self._capturing = False
            for s, t in self._captured:
                same = (s.argmax(-1) == t.argmax(-1)).sum().cpu()
                self._agree += torch.stack([same, same.new_tensor(s.argmax(-1).numel())])
            self._captured.clear()
            return result

        pl_module.training_step = training_step
        if is_overridden("validation_step", pl_module):   # else Lightning would think it validates
            pl_module.validation_step = validation_step

    def _combine(self, pl_module: Any, result: Any, captured: list[tuple[torch.Tensor, torch.Tensor]]) -> Any:
        if result is None:                       # the module skipped this batch
            return None
        task = result["loss"] if isinstance(result, Mapping) else result
        if not isinstance(task, torch.Tensor):
            raise TypeError("DistillationCallback: training_step must return a loss tensor or a dict with "
                            f"'loss', got {type(result).__name__}")
        if not captured:
            where = f"the submodule {self.module_path!r}" if self.module_path else "the module's forward"
            raise RuntimeError(f"DistillationCallback: {where} did not run during training_step, so there "
                               "are no student logits to distil; set module= to the submodule that "
                               "computes the logits")
        kd = sum(self._soft.loss_from_logits(s, t, None)[0] for s, t in captured) / len(captured)
        loss = self.alpha * task + (1.0 - self.alpha) * kd
        n = captured[0][0].reshape(-1, captured[0][0].shape[-1]).shape[0]
        pl_module.log("distill/kd", kd.detach(), on_step=True, on_epoch=True, batch_size=n,
                      sync_dist=True)
        pl_module.log("distill/task_loss", task.detach(), on_step=True, on_epoch=True, batch_size=n,
                      sync_dist=True)
        pl_module.log("distill/loss", loss.detach(), on_step=True, on_epoch=True, batch_size=n,
                      sync_dist=True)
        if isinstance(result, Mapping):
            return {**result, "loss": loss}
        return loss

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        self._place_teacher(pl_module)

    def on_validation_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        self._agree.zero_()

    def on_validation_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        same, rows = self._agree.tolist()
        if rows:
            pl_module.log("distill/val_agreement", same / rows, sync_dist=True)

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage == "fit":
            self._restore()

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self._restore()

    def _restore(self) -> None:
        """Remove the hook and give the module its own ``training_step`` back."""
        pl_module = self._pl_module
        if pl_module is None:
            return
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        for name, original in (("training_step", self._original_step),
                               ("validation_step", self._original_val_step)):
            if original is None:
                pl_module.__dict__.pop(name, None)
            else:
                setattr(pl_module, name, original)
        self._pl_module = None

