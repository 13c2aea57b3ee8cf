"""The training loop: :class:`Distiller` trains a student with a distillation mode."""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdfast.train import distributed as _dist
from kdfast.train import metrics as _metrics
from kdfast.train._batch import move_to, paired, unpack
from kdfast.train.checkpoint import capture_rng, load_checkpoint, restore_rng, save_checkpoint
from kdfast.train.modes import DistillMode, resolve_mode
from kdfast.train.optim import build_optimizer, build_scheduler, check_specs

__all__ = ["Distiller", "FitResult"]

AMP_CHOICES = ("auto", "bf16", "fp16", None)

OptimizerSpec = str | Callable[[list[dict[str, Any]]], torch.optim.Optimizer] | None
SchedulerSpec = str | Callable[[torch.optim.Optimizer], Any] | None
Callback = Callable[[str, "Distiller", dict[str, Any]], None]


@dataclass
class FitResult:
    """What :meth:`Distiller.fit` returns.

    Attributes:
        metrics: the last evaluation (``{}`` without evaluation data).
        history: one dict per logged step (``step``, ``epoch``, ``loss``, ``lr`` and the
            mode's loss parts) and per evaluation (``eval/<metric>``).
        steps: optimizer steps taken in total (including those before a resume).
        seconds: wall time of this call.
        checkpoint: path of the last checkpoint written (``None`` without a folder).
    """

    metrics: dict[str, float]
    history: list[dict[str, Any]] = field(default_factory=list)
    steps: int = 0
    seconds: float = 0.0
    checkpoint: Path | None = None


def _loader_generators(data: Any) -> list[torch.Generator]:
    """The private generators of a loader (and of its sampler) that decide its order."""
    if isinstance(data, paired):
        return _loader_generators(data.source) + _loader_generators(data.target)
    found = []
    for owner in (data, getattr(data, "sampler", None), getattr(data, "batch_sampler", None),
                  getattr(getattr(data, "batch_sampler", None), "sampler", None)):
        g = getattr(owner, "generator", None)
        if isinstance(g, torch.Generator) and all(g is not h for h in found):
            found.append(g)
    return found


class Distiller:
    r"""Trains ``student`` with a distillation ``mode`` and evaluates it.

    The loop: AdamW (or ``optimizer``), an optional learning-rate schedule stepped per
    optimizer step, gradient accumulation over ``grad_accum`` micro-batches, mixed
    precision on CUDA (``amp``), gradient clipping, evaluation every epoch (or every
    ``eval_every`` steps) with :mod:`kdfast.train.metrics`, a progress bar, a JSON-lines
    log, and checkpoints from which :meth:`fit` resumes with an identical continuation
    (same batches, same random numbers, same parameters to the last bit on the CPU).

    Everything the mode learns besides the student (hint regressors, a discriminator,
    peers) is trained too; the mode's ``prepare`` runs on the first batch before the
    optimizer is built.

    Args:
        student: the model to train; its logits are ``[..., C]``.
        mode: a :class:`~kdfast.train.DistillMode` or a mode name (``"soft"``,
            ``"feature"``, ..., see :data:`kdfast.train.MODES`) built with ``mode_options``.
        optimizer: ``"adamw"`` (default), ``"adam"``, ``"sgd"`` (momentum 0.9) or
            ``callable(param_groups) -> Optimizer``.
        lr, weight_decay: of the built-in optimizers.
        scheduler: ``"constant"`` (default), ``"cosine"`` or ``"linear"`` (to 0 over the
            run, after ``warmup_steps`` of linear warm-up), or
            ``callable(optimizer) -> scheduler`` (stepped once per optimizer step).
        epochs: passes over the training data; ``max_steps`` caps the optimizer steps.
        grad_accum: micro-batches per optimizer step (each loss is divided by it; an
            epoch's leftover micro-batches make one last, smaller step).
        amp: ``"auto"`` (bfloat16 autocast on CUDA where supported, else float16 with a
            ``GradScaler``; nothing on the CPU), ``"bf16"``, ``"fp16"`` or ``None``.
        grad_clip: clip the global gradient norm to this value (``None``: no clipping).
        device: where to train (default: the student's device).
        num_classes: for the metrics (default: the student's logit width).
        eval_every: evaluate every this many optimizer steps (default: each epoch end).
        checkpoint_dir: folder for ``last.pt`` (written atomically) and ``log.jsonl``.
        save_every: also checkpoint every this many optimizer steps (default: epoch ends).
        log_every: log the running loss every this many optimizer steps.
        progress: show a ``tqdm`` progress bar (rank 0 only; a plain log line every
            ``log_every`` steps when tqdm is not installed).
        callbacks: ``callback(event, distiller, logs)`` for ``event`` in ``"step"``,
            ``"eval"``, ``"epoch"`` (on every process, with the same logs).
        shard_data: under ``torchrun`` (a ``torch.distributed`` group of more than one
            process) the training and evaluation ``DataLoader`` s are re-built over this
            process's shard (see :func:`kdfast.train.distributed.shard_loader`; their
            ``batch_size`` is per process). ``None`` (default): only then; ``True``: also
            in a single process, whose sequence of batches is then the global batches of
            any world size; ``False``: never (the data given is already per process).
        data_seed: seed of the distributed sampler's shuffle (with the epoch number).
        mode_options: keyword arguments of the mode when ``mode`` is a name.

    Distributed training (``torchrun --nproc_per_node=N``, after
    :func:`kdfast.train.distributed.init_distributed`): every process starts from rank 0's
    weights, gradients are averaged once per optimizer step, so a step equals a single
    process's step on the global batch; only rank 0 writes checkpoints, logs and the
    progress bar; logged losses and evaluation metrics are reduced over the processes.
    A checkpoint resumes under another world size too (with the same global batch, or
    any batch at an epoch boundary).

    Example::

        >>> import torch, kdfast
        >>> from torch.utils.data import DataLoader, TensorDataset
        >>> x, y = torch.randn(256, 16), torch.randint(0, 4, (256,))
        >>> teacher, student = torch.nn.Linear(16, 4), torch.nn.Linear(16, 4)
        >>> distiller = kdfast.train.Distiller(student, "soft", teacher=teacher, temperature=4.0,
        ...                                    epochs=2, lr=1e-2, progress=False)
        >>> result = distiller.fit(DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True),
        ...                        eval_data=DataLoader(TensorDataset(x, y), batch_size=128))
        >>> sorted(result.metrics)[:3]
        ['accuracy', 'agreement', 'ece']
    """

    def __init__(self, student: nn.Module, mode: DistillMode | str, *, optimizer: OptimizerSpec = "adamw",
                 lr: float = 1e-3, weight_decay: float = 0.0, scheduler: SchedulerSpec = "constant",
                 warmup_steps: int = 0, epochs: int = 1, max_steps: int | None = None, grad_accum: int = 1,
                 amp: str | None = "auto", grad_clip: float | None = None,
                 device: torch.device | str | None = None, num_classes: int | None = None,
                 eval_every: int | None = None, checkpoint_dir: str | os.PathLike | None = None,
                 save_every: int | None = None, log_every: int = 10, progress: bool = True,
                 callbacks: Sequence[Callback] = (), shard_data: bool | None = None, data_seed: int = 0,
                 **mode_options: Any) -> None:
        mode = resolve_mode("Distiller", student, mode, mode_options)
        self.student, self.mode = student, mode
        check_specs("Distiller", optimizer, scheduler)
        self._optimizer_spec, self._scheduler_spec = optimizer, scheduler
        self.lr = _positive_float("lr", lr)
        self.weight_decay = _positive_float("weight_decay", weight_decay, allow_zero=True)
        self.warmup_steps = _count("warmup_steps", warmup_steps, allow_zero=True)
        self.epochs = _count("epochs", epochs)
        self.max_steps = None if max_steps is None else _count("max_steps", max_steps)
        self.grad_accum = _count("grad_accum", grad_accum)
        if amp not in AMP_CHOICES:
            raise ValueError(f"Distiller: amp must be one of {AMP_CHOICES}, got {amp!r}")
        self.grad_clip = None if grad_clip is None else _positive_float("grad_clip", grad_clip)
        self.device = torch.device(device) if device is not None else _model_device(student)
        self.amp_dtype = _amp_dtype(amp, self.device)
        self.num_classes = None if num_classes is None else _count("num_classes", num_classes)
        self.eval_every = None if eval_every is None else _count("eval_every", eval_every)
        self.checkpoint_dir = None if checkpoint_dir is None else Path(checkpoint_dir)
        self.save_every = None if save_every is None else _count("save_every", save_every)
        self.log_every = _count("log_every", log_every)
        self.progress = progress
        self.callbacks = list(callbacks)
        if shard_data not in (None, True, False):
            raise ValueError(f"Distiller: shard_data must be None, True or False, got {shard_data!r}")
        self.shard_data = shard_data
        self.data_seed = _count("data_seed", data_seed, allow_zero=True)
        self.optimizer: torch.optim.Optimizer | None = None
        self.scheduler: Any = None
        self.scaler: torch.amp.GradScaler | None = None
        self.step = 0                      # optimizer steps taken
        self.epoch = 0                     # current epoch (0-based)
        self.history: list[dict[str, Any]] = []
        self._prepared = False
        self._params: list[nn.Parameter] = []
        self._inferred_classes: int | None = None
        self._local_batch: int | None = None
        self._plain_progress = False

    # -- set-up ------------------------------------------------------------------------------

    def parameters(self) -> list[nn.Parameter]:
        """Everything the optimizer trains: the student's and the mode's parameters."""
        seen, params = set(), []
        for p in list(self.student.parameters()) + list(self.mode.trainable_parameters()):
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                params.append(p)
        return params

    def _build_optimizer(self, total_steps: int) -> None:
        self._params = self.parameters()           # fixed from here on (clipping reuses it)
        self.optimizer = build_optimizer(self._params, self._optimizer_spec, lr=self.lr,
                                         weight_decay=self.weight_decay)
        self.scheduler = build_scheduler(self.optimizer, self._scheduler_spec,
                                         warmup_steps=self.warmup_steps, total_steps=total_steps)
        if self.amp_dtype == torch.float16:
            self.scaler = torch.amp.GradScaler(self.device.type)

    def prepare(self, train_data: Iterable, total_steps: int | None = None) -> None:
        """Move student and mode to the device, run the mode's ``prepare`` on the first
        batch and build the optimizer (``fit`` calls this; call it yourself to inspect
        ``distiller.optimizer`` first). Draws no random numbers from the global state."""
        if self._prepared:
            return
        self.student.to(self.device)
        self.mode.to(self.device)
        generators = _loader_generators(train_data)
        rng = capture_rng(generators)
        first = next(iter(train_data), None)
        if first is None:
            raise ValueError("Distiller: the training data is empty")
        first = move_to(first, self.device)
        was_training = self.student.training
        self.student.train()
        with self._autocast():
            self.mode.prepare(self.student, first)
        self.student.train(was_training)
        restore_rng(rng, generators)
        _dist.broadcast_modules([self.student, self.mode])     # every process starts from rank 0's
        if total_steps is None:
            total_steps = self._total_steps(train_data)
        self._build_optimizer(total_steps)
        self._prepared = True

    def shard(self, data: Iterable, *, train: bool = True) -> Iterable:
        """``data`` as this process sees it (see ``shard_data``); ``fit`` calls this itself."""
        if self.shard_data is False or (self.shard_data is None and not _dist.is_distributed()):
            return data
        return _dist.shard_loader(data, train=train, seed=self.data_seed)

    def _total_steps(self, train_data: Iterable) -> int:
        try:
            per_epoch = math.ceil(len(train_data) / self.grad_accum)  # type: ignore[arg-type]
        except TypeError:
            per_epoch = None
        if per_epoch is None:
            if self.max_steps is None:
                raise ValueError("Distiller: training data without len() needs max_steps")
            return self.max_steps
        total = per_epoch * self.epochs
        return total if self.max_steps is None else min(total, self.max_steps)

    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    # -- checkpoints --------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Student, mode, optimizer, scheduler, scaler, counters and history."""
        return {"student": self.student.state_dict(), "mode": self.mode.state_dict(),
                "mode_name": self.mode.name,
                "optimizer": None if self.optimizer is None else self.optimizer.state_dict(),
                "scheduler": None if self.scheduler is None else self.scheduler.state_dict(),
                "scaler": None if self.scaler is None else self.scaler.state_dict(),
                "step": self.step, "epoch": self.epoch, "history": list(self.history)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (after :meth:`prepare`, so that lazily built parts and
        the optimizer exist)."""
        if state.get("mode_name") != self.mode.name:
            raise ValueError(f"Distiller: the checkpoint was written by mode {state.get('mode_name')!r}, "
                             f"this distiller runs {self.mode.name!r}")
        self.student.load_state_dict(state["student"])
        self.mode.load_state_dict(state["mode"])
        if self.optimizer is not None and state["optimizer"] is not None:
            self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None and state["scheduler"] is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and state["scaler"] is not None:
            self.scaler.load_state_dict(state["scaler"])
        self.step, self.epoch = state["step"], state["epoch"]
        self.history = list(state["history"])

    def save(self, path: str | os.PathLike, *, position: dict[str, Any] | None = None) -> Path:
        """Write a checkpoint to ``path`` atomically (``fit`` calls this itself; under
        ``torch.distributed`` only rank 0 writes, the others return the path)."""
        path = Path(path)
        if _dist.is_main_process():
            save_checkpoint(path, {**self.state_dict(), "position": position})
        return path

    def _resume_position(self, position: dict[str, Any] | None, train_data: Iterable
                         ) -> tuple[dict[str, Any] | None, bool]:
        """This process's part of a checkpoint's data position, and whether the loaders'
        own generator states apply (only under the world size that wrote it)."""
        if position is None:
            return None, True
        world, me = _dist.world_size(), _dist.rank()
        saved_world, local = position.get("world", 1), _dist.local_batch_size(train_data)
        ranks = position.get("ranks") or [position]
        if saved_world == world and len(ranks) == world and position.get("batch") in (None, local):
            return dict(ranks[me]), True
        mine = dict(ranks[0])          # rank 0's random state; the loaders' order is the sampler's
        if "micro" in mine:
            samples = position.get("samples")
            if samples is None or local is None or samples % (local * world):
                raise ValueError(
                    f"Distiller: this checkpoint stopped inside an epoch after {samples} samples with "
                    f"{saved_world} process(es); resuming with {world} process(es) of batch size {local} "
                    "needs a global batch that divides it (keep batch_size x world_size the same) and "
                    "DataLoaders")
            mine["micro"] = samples // (local * world)
        return mine, False

    # -- the loop ------------------------------------------------------------------------------

    def fit(self, train_data: Iterable, eval_data: Iterable | None = None, *,
            resume: str | os.PathLike | bool | None = None) -> FitResult:
        """Train, evaluating on ``eval_data`` (batches ``(inputs, labels)``).

        Args:
            train_data: an iterable of batches, re-iterated every epoch (a ``DataLoader``,
                :func:`kdfast.train.paired` for the domain modes, a cache's loader ...).
            eval_data: evaluation batches, or ``None``.
            resume: a checkpoint path, or ``True`` for ``checkpoint_dir/last.pt`` when it
                exists. The data must be the same (same order given the same random state).

        Returns:
            :class:`FitResult`.
        """
        start = time.perf_counter()
        train_data = self.shard(train_data, train=True)
        if eval_data is not None:
            eval_data = self.shard(eval_data, train=False)
        total = self._total_steps(train_data)
        self.prepare(train_data, total)
        position, same_world = None, True
        if resume:
            path = self.checkpoint_dir / "last.pt" if resume is True and self.checkpoint_dir else resume
            if resume is True and (path is None or not Path(path).is_file()):
                path = None
            if path is not None:
                payload = load_checkpoint(path, map_location=self.device)
                self.load_state_dict(payload)
                position, same_world = self._resume_position(payload.get("position"), train_data)
        generators = _loader_generators(train_data)
        restore = (lambda state: restore_rng(state, generators)) if same_world else \
            (lambda state: restore_rng({**state, "generators": []}))
        self._local_batch = _dist.local_batch_size(train_data)
        bar = self._bar(total)
        last_ckpt: Path | None = None
        eval_metrics: dict[str, float] = {}
        running: torch.Tensor | None = None      # loss sum since the last log, on the device (no sync)
        counted = 0
        try:
            while self.epoch < self.epochs and self.step < total:
                skip = 0
                _dist.set_epoch(train_data, self.epoch)
                if position is not None and "epoch_rng" in position:   # resuming inside this epoch
                    restore(position["epoch_rng"])
                    epoch_rng, skip = capture_rng(generators), position["micro"]
                else:
                    if position is not None:              # resuming at an epoch boundary
                        restore(position["rng"])
                        position = None
                    epoch_rng = capture_rng(generators)
                self.student.train()
                self.mode.train()
                micro, pending = 0, 0
                iterator = iter(train_data)
                for _ in range(skip):                     # the batches done before the checkpoint
                    next(iterator)
                    micro += 1
                if position is not None:
                    restore(position["rng"])
                    position = None
                for batch in iterator:
                    batch = move_to(batch, self.device, non_blocking=True)
                    with self._autocast():
                        out = self.mode(self.student, batch)
                    loss = out.loss / self.grad_accum
                    if self.scaler is not None:
                        self.scaler.scale(loss).backward()
                    else:
                        loss.backward()
                    micro += 1
                    pending += 1
                    value = out.loss.detach().float()
                    running = value if running is None else running + value
                    counted += 1
                    if pending == self.grad_accum:
                        self._optimizer_step()
                        pending = 0
                        if self._after_step(out, running, counted, bar) is not None:
                            running, counted = None, 0
                        if self.save_every and self.step % self.save_every == 0:
                            last_ckpt = self._checkpoint({"epoch_rng": epoch_rng, "micro": micro,
                                                          "rng": capture_rng(generators)})
                        if self.eval_every and self.step % self.eval_every == 0 and eval_data is not None:
                            eval_metrics = self._evaluate_and_log(eval_data)
                        if self.step >= total:
                            break
                if pending:                              # the epoch's leftover micro-batches
                    self._optimizer_step()
                    if self._after_step(out, running, counted, bar) is not None:
                        running, counted = None, 0
                if self.step >= total and micro < _len_or(train_data, micro):
                    at = {"epoch_rng": epoch_rng, "micro": micro, "rng": capture_rng(generators)}
                    if self.checkpoint_dir:
                        last_ckpt = self._checkpoint(at)
                    break
                self.epoch += 1
                if eval_data is not None and not self.eval_every:
                    eval_metrics = self._evaluate_and_log(eval_data)
                self._emit("epoch", {"epoch": self.epoch, "step": self.step, **eval_metrics})
                if self.checkpoint_dir:
                    last_ckpt = self._checkpoint({"rng": capture_rng(generators)})
        finally:
            if bar is not None:
                bar.close()
        if eval_data is not None and not eval_metrics:
            eval_metrics = self._evaluate_and_log(eval_data)
        return FitResult(eval_metrics, list(self.history), self.step, time.perf_counter() - start, last_ckpt)

    def _optimizer_step(self) -> None:
        _dist.all_reduce_gradients(self._params)
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        if self.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(self._params, self.grad_clip)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.scheduler is not None:
            self.scheduler.step()
        self.mode.end_step(self.student)
        self.step += 1

    def _after_step(self, out: Any, running: torch.Tensor, counted: int, bar: Any) -> dict[str, Any] | None:
        """Advance the bar; on a log step, log the mean loss since the last log (the only
        place the loss is read back from the device) and return the logs."""
        if bar is not None:
            bar.update(1)
        if self.step % self.log_every and self.step != 1:
            return None
        local = {"loss": (running / counted).item(), **{k: float(v) for k, v in out.parts.items()}}
        if _dist.is_distributed():             # the mean over the processes of each logged value
            gathered = _dist.all_gather_objects(local)
            local = {k: sum(g[k] for g in gathered if k in g) / sum(k in g for g in gathered)
                     for k in dict.fromkeys(k for g in gathered for k in g)}
        mean_loss = local.pop("loss")
        if bar is not None:
            bar.set_postfix(loss=f"{mean_loss:.4f}", epoch=self.epoch + 1, refresh=False)
        elif self.progress and _dist.is_main_process() and self._plain_progress:
            print(f"{self.mode.name}: step {self.step} epoch {self.epoch + 1} loss {mean_loss:.4f}",
                  flush=True)
        logs = {"step": self.step, "epoch": self.epoch, "loss": mean_loss,
                "lr": self.optimizer.param_groups[0]["lr"]}
        logs.update(local)
        self._log(logs)
        self._emit("step", logs)
        return logs

    def _evaluate_and_log(self, eval_data: Iterable) -> dict[str, float]:
        result = self.evaluate(eval_data)
        self._log({"step": self.step, "epoch": self.epoch, **{f"eval/{k}": v for k, v in result.items()}})
        self._emit("eval", result)
        return result

    def _checkpoint(self, position: dict[str, Any] | None) -> Path:
        position = dict(position or {})
        world = _dist.world_size()
        samples = None
        if "micro" in position and self._local_batch is not None:
            samples = position["micro"] * self._local_batch * world
        if world > 1:                       # every process's random state, for a same-size resume
            position = {"ranks": _dist.all_gather_objects(position)}
        position.update(world=world, batch=self._local_batch, samples=samples)
        return self.save(self.checkpoint_dir / "last.pt", position=position)

    def _log(self, logs: dict[str, Any]) -> None:
        self.history.append(logs)
        if self.checkpoint_dir is not None and _dist.is_main_process():
            self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
            with open(self.checkpoint_dir / "log.jsonl", "a") as f:
                f.write(json.dumps(logs) + "\n")

    def _emit(self, event: str, logs: dict[str, Any]) -> None:
        for cb in self.callbacks:
            cb(event, self, logs)

    def _bar(self, total: int):
        self._plain_progress = False
        if not self.progress or not _dist.is_main_process():
            return None
        try:
            from tqdm.auto import tqdm
        except ImportError:                  # tqdm is optional: plain lines on log steps instead
            self._plain_progress = True
            return None
        return tqdm(total=total, initial=self.step, desc=f"{self.mode.name}", unit="step",
                    dynamic_ncols=True, leave=False)

    # -- evaluation ----------------------------------------------------------------------------

    def evaluate(self, data: Iterable, *, teacher: nn.Module | bool | None = True) -> dict[str, float]:
        """Metrics of the student on ``data`` (batches ``(inputs, labels)``): accuracy,
        top-5 accuracy (when there are more than 5 classes), macro precision / recall /
        F1, expected calibration error, NLL and, with a teacher, agreement with it.

        Args:
            teacher: ``True`` (default): the mode's teacher (``mode.eval_teacher()``);
                a model; or ``None`` / ``False`` for none.
        """
        if teacher is True:
            teacher = self.mode.eval_teacher()
        num_classes = self.num_classes or self._inferred_classes
        if num_classes is None:
            first = next(iter(data), None)
            if first is None:
                raise ValueError("Distiller.evaluate: the evaluation data is empty")
            inputs, _ = unpack(move_to(first, self.device), "Distiller.evaluate")
            was = self.student.training
            self.student.eval()
            with torch.inference_mode(), self._autocast():
                num_classes = self.mode.logits(self.student, inputs).shape[-1]
            self.student.train(was)
            self._inferred_classes = num_classes    # probed once, not on every evaluation
        topk = (5,) if num_classes > 5 else ()
        with self._autocast():
            return _metrics.evaluate(self.student, data, num_classes=num_classes, device=self.device,
                                     teacher=teacher or None, forward=self.mode.logits, topk=topk,
                                     sync=_dist.is_distributed())

    def close(self) -> None:
        """Release the mode's hooks (the student is left as trained)."""
        self.mode.close()


def _len_or(data: Any, default: int) -> int:
    try:
        return len(data)
    except TypeError:
        return default + 1


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _amp_dtype(amp: str | None, device: torch.device) -> torch.dtype | None:
    if amp is None or (amp == "auto" and device.type != "cuda"):
        return None
    if amp == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if amp == "bf16" else torch.float16


def _positive_float(name: str, value: Any, *, allow_zero: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"Distiller: {name} must be a finite number {bound}, got {value!r}")
    return float(value)


def _count(name: str, value: Any, *, allow_zero: bool = False) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < (0 if allow_zero else 1):
        raise ValueError(f"Distiller: {name} must be an int >= {0 if allow_zero else 1}, got {value!r}")
    return value
