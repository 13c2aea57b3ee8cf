"""Lifelong learning without forgetting: a multi-head network learns tasks one after another."""

from __future__ import annotations

import copy
import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from kdfast.train._batch import move_to, unpack
from kdfast.train.modes.base import BACKENDS, DistillMode, StepOutput, Supervised, check_choice, check_real

if TYPE_CHECKING:
    from kdfast.train.distiller import FitResult

__all__ = ["Lifelong", "LifelongResult", "MultiHeadNet", "Task", "learn_tasks", "task_accuracy"]

METHODS = ("lwf", "finetune")


def _call(fn: Callable[..., Any], inputs: Any) -> Any:
    return fn(**inputs) if isinstance(inputs, Mapping) else fn(inputs)


class MultiHeadNet(nn.Module):
    """A shared backbone with one linear head per task.

    ``forward`` returns the concatenation of every head's logits, ``[..., sum_k C_k]``:
    task ``k``'s local class ``c`` is the global class ``offset_k + c``, with ``offset_k``
    the classes of the heads before it (:meth:`task_slice` gives the columns).

    Args:
        backbone: maps the inputs (a tensor, or a mapping called as ``backbone(**inputs)``)
            to features ``[..., feature_dim]``.
        feature_dim: the width of the features, the input width of every head.

    Example::

        >>> net = kdfast.train.MultiHeadNet(torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU()), 16)
        >>> net.add_head(3), net.add_head(2)
        (0, 1)
        >>> net(torch.randn(4, 8)).shape, net.task_slice(1)
        (torch.Size([4, 5]), slice(3, 5, None))
    """

    def __init__(self, backbone: nn.Module, feature_dim: int) -> None:
        super().__init__()
        if not isinstance(backbone, nn.Module):
            raise TypeError(f"MultiHeadNet: backbone must be an nn.Module, got {type(backbone).__name__}")
        if isinstance(feature_dim, bool) or not isinstance(feature_dim, int) or feature_dim < 1:
            raise ValueError(f"MultiHeadNet: feature_dim must be an int >= 1, got {feature_dim!r}")
        self.backbone = backbone
        self.feature_dim = feature_dim
        self.heads = nn.ModuleList()

    @property
    def head_classes(self) -> list[int]:
        """The class count of every head, in task order."""
        return [head.out_features for head in self.heads]

    @property
    def num_classes(self) -> int:
        """The width of :meth:`forward`'s logits (all heads)."""
        return sum(self.head_classes)

    def add_head(self, num_classes: int) -> int:
        """Append a new task's linear head (on the backbone's device and dtype); returns
        the task's index."""
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"MultiHeadNet.add_head: num_classes must be an int >= 1, got {num_classes!r}")
        like = next(self.backbone.parameters(), None)
        kw = {} if like is None else {"device": like.device, "dtype": like.dtype}
        self.heads.append(nn.Linear(self.feature_dim, num_classes, **kw))
        return len(self.heads) - 1

    def task_slice(self, task: int) -> slice:
        """The columns of task ``task`` in :meth:`forward`'s logits."""
        n = len(self.heads)
        if isinstance(task, bool) or not isinstance(task, int) or not -n <= task < n:
            raise IndexError(f"MultiHeadNet.task_slice: task must be an int in [0, {n}), got {task!r}")
        task %= n
        start = sum(self.head_classes[:task])
        return slice(start, start + self.heads[task].out_features)

    def features(self, inputs: Any) -> torch.Tensor:
        """The backbone's features ``[..., feature_dim]``."""
        return _call(self.backbone, inputs)

    def heads_forward(self, inputs: Any) -> list[torch.Tensor]:
        """Every head's logits ``[..., C_k]``, in task order (one backbone pass)."""
        if not len(self.heads):
            raise RuntimeError("MultiHeadNet: the network has no head yet; call add_head(num_classes) first")
        feats = self.features(inputs)
        return [head(feats) for head in self.heads]

    def forward(self, inputs: Any) -> torch.Tensor:
        return torch.cat(self.heads_forward(inputs), dim=-1)


def _local_labels(fn: str, labels: torch.Tensor, start: int, stop: int, ignore_index: int) -> torch.Tensor:
    """Global labels of the task with columns ``[start, stop)`` made local (``- start``);
    rows labelled ``ignore_index`` stay so. Raises on a label outside the task."""
    labelled = labels != ignore_index
    outside = labelled & ((labels < start) | (labels >= stop))
    if bool(outside.any()):
        bad = labels[outside][:5].tolist()
        raise ValueError(f"{fn}: labels must be global class indices of the new task, in [{start}, {stop}) "
                         f"(or ignore_index={ignore_index}), got {bad}")
    return torch.where(labelled, labels - start, labels)


class Lifelong(DistillMode):
    r"""Learning without forgetting (Li & Hoiem, "Learning without Forgetting", ECCV 2016 /
    TPAMI 2017): a network with one head per task learns a new task from the new task's
    data alone, while the old heads' outputs on that data are held to those of the network
    before the new task (the frozen ``teacher``)::

        loss = CE(s[new columns], y - offset) + lwf_weight * sum_k KL(softmax(t_k / T) || softmax(s_k / T))

    where ``s_k`` / ``t_k`` are old head ``k``'s logits of the student / teacher (a
    softmax per old head) and ``offset`` the number of old columns (:attr:`old_classes`).
    The paper's old-task loss is the modified cross-entropy
    :math:`-\sum_c p^{(T)}_{t,c} \log p^{(T)}_{s,c}` at ``T = 2`` with weight
    :math:`\lambda_o = 1`; the KL term above, ``self.losses.kd_loss(s_k, t_k,
    temperature=T) / T^2``, is that cross-entropy minus the teacher's entropy (a constant
    of the student), so it has the same gradient. As in the paper it is *not* scaled by
    ``T^2``; for Hinton's scaling pass ``lwf_weight * T**2``.

    Labels are global class indices of the new task (``[old_classes, C)`` of the
    student's ``C`` columns, the new head's being the last); rows labelled
    ``ignore_index`` (or no labels) only get the LwF term. Gradients reach the whole
    student: backbone, old heads (through the LwF term) and new head (through the CE).
    :func:`learn_tasks` drives a whole task sequence with a :class:`MultiHeadNet`.

    Args:
        teacher: the network before the new task (a frozen copy), whose logits are the old
            heads' ``[..., old_classes]``.
        old_heads: class counts of the old heads, in order; default: the teacher's
            ``head_classes`` for a :class:`MultiHeadNet`, else one head of the teacher's
            whole width.
        temperature: ``T > 0`` of the LwF term (the paper's is 2).
        lwf_weight: ``lambda_o >= 0``, the weight of the LwF term.
        backend, ignore_index, forward: see :class:`DistillMode`.

    Parts reported: ``ce``, ``lwf`` (the unweighted sum over old heads) and ``lwf<k>``
    per old head.

    Example::

        >>> import copy
        >>> net = kdfast.train.MultiHeadNet(torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU()), 16)
        >>> _ = net.add_head(3)
        >>> teacher = copy.deepcopy(net)
        >>> _ = net.add_head(2)                      # the new task: global classes 3 and 4
        >>> mode = kdfast.train.Lifelong(teacher, temperature=2.0)
        >>> out = mode(net, (torch.randn(16, 8), torch.randint(3, 5, (16,))))
        >>> out.loss.backward()
        >>> sorted(out.parts)
        ['ce', 'lwf', 'lwf0']
    """

    name = "lifelong"

    def __init__(self, teacher: nn.Module, *, old_heads: Sequence[int] | None = None,
                 temperature: float = 2.0, lwf_weight: float = 1.0, backend: str = "kdfast",
                 ignore_index: int = -100, forward: Callable[[nn.Module, Any], torch.Tensor] | None = None
                 ) -> None:
        super().__init__(teacher, backend=backend, ignore_index=ignore_index, forward=forward)
        fn = "Lifelong"
        if old_heads is None and isinstance(teacher, MultiHeadNet):
            old_heads = teacher.head_classes
        if old_heads is not None:
            if isinstance(old_heads, (str, bytes)) or not isinstance(old_heads, Sequence) or not old_heads \
                    or any(isinstance(c, bool) or not isinstance(c, int) or c < 1 for c in old_heads):
                raise ValueError(f"{fn}: old_heads must be a non-empty sequence of class counts >= 1, "
                                 f"got {old_heads!r}")
            old_heads = list(old_heads)
        self.old_heads: list[int] | None = old_heads
        self.temperature = check_real(fn, "temperature", temperature, low=0.0, low_open=True)
        self.lwf_weight = check_real(fn, "lwf_weight", lwf_weight, low=0.0)

    @property
    def old_classes(self) -> int | None:
        """The number of columns of the old heads (``None`` until known, for a plain
        teacher without ``old_heads``)."""
        return None if self.old_heads is None else sum(self.old_heads)

    def _bounds(self, teacher_width: int) -> list[tuple[int, int]]:
        heads = self.old_heads if self.old_heads is not None else [teacher_width]
        if sum(heads) != teacher_width:
            raise ValueError(f"Lifelong: the teacher outputs {teacher_width} columns but old_heads {heads} "
                             f"cover {sum(heads)}")
        bounds, start = [], 0
        for c in heads:
            bounds.append((start, start + c))
            start += c
        return bounds

    def forward(self, student: nn.Module, batch: Any) -> StepOutput:
        inputs, labels = self.unpack(batch)
        t = self.teacher_logits(inputs)
        s = self.logits(student, inputs)
        bounds = self._bounds(t.shape[-1])
        old, width = bounds[-1][1], s.shape[-1]
        if width <= old:
            raise ValueError(f"Lifelong: the student outputs {width} columns, no more than the old heads' "
                             f"{old}; add the new task's head first")
        if s.shape[:-1] != t.shape[:-1]:
            raise ValueError(f"Lifelong: student logits {tuple(s.shape)} and teacher logits "
                             f"{tuple(t.shape)} differ in their leading dimensions")
        new = s[..., old:]
        local = None if labels is None else _local_labels("Lifelong", labels, old, width, self.ignore_index)
        ce = self.cross_entropy(new, local)
        scale = self.temperature ** 2
        terms = [self.losses.kd_loss(s[..., a:b], t[..., a:b], temperature=self.temperature) / scale
                 for a, b in bounds]
        lwf = sum(terms)
        parts = {"ce": ce.detach(), "lwf": lwf.detach()}
        parts.update({f"lwf{k}": term.detach() for k, term in enumerate(terms)})
        return StepOutput(ce + self.lwf_weight * lwf, new, local, parts)

    def extra_repr(self) -> str:
        return (f"old_heads={self.old_heads}, temperature={self.temperature}, lwf_weight={self.lwf_weight}, "
                f"{super().extra_repr()}")


class _NewTaskCE(Supervised):
    """Cross-entropy on the new task's columns only (``columns`` of the logits, or all of
    them when ``None``) with the global labels made local (``- start``): the first task,
    the fine-tuning baseline and the warm-up of :func:`learn_tasks`."""

    def __init__(self, columns: slice | None, start: int, stop: int, *, ignore_index: int = -100,
                 forward: Callable[[nn.Module, Any], torch.Tensor] | None = None) -> None:
        super().__init__(ignore_index=ignore_index, forward=forward)
        self.columns, self.start, self.stop = columns, start, stop

    def forward(self, student: nn.Module, batch: Any) -> StepOutput:
        inputs, labels = self.unpack(batch)
        if labels is None:
            raise ValueError("learn_tasks: a training batch has no labels")
        logits = self.logits(student, inputs)
        new = logits if self.columns is None else logits[..., self.columns]
        local = _local_labels("learn_tasks", labels, self.start, self.stop, self.ignore_index)
        loss = self.cross_entropy(new, local)
        return StepOutput(loss, new, local, {"ce": loss.detach()})


@dataclass
class Task:
    """One task of :func:`learn_tasks`.

    Attributes:
        name: a name unique in the sequence.
        num_classes: the task's classes (the size of its head).
        train_data: batches ``(inputs, labels)`` with *global* class indices of this task.
        eval_data: evaluation batches, labels likewise global (needed unless
            :func:`learn_tasks` gets an ``eval_fn``).
    """

    name: str
    num_classes: int
    train_data: Iterable
    eval_data: Iterable | None = None


@dataclass
class LifelongResult:
    """What :func:`learn_tasks` returns.

    Attributes:
        tasks: the task names, in order.
        method: ``"lwf"`` or ``"finetune"``.
        accuracy: ``accuracy[i][j]``, the accuracy on task ``j`` after learning task ``i``
            (task-aware: the argmax within task ``j``'s columns); ``nan`` for ``j > i``.
        fits: the :class:`~kdfast.train.FitResult` of each task's training.
    """

    tasks: list[str]
    method: str
    accuracy: list[list[float]]
    fits: list[FitResult] = field(default_factory=list)

    def average_accuracy(self, after: int = -1) -> float:
        """Mean accuracy over the tasks learnt so far, after task ``after`` (default: the last)."""
        i = range(len(self.tasks))[after]
        return sum(self.accuracy[i][: i + 1]) / (i + 1)

    def forgetting(self) -> list[float]:
        """Per task but the last: its best accuracy before the final task minus its final
        accuracy (positive: forgotten)."""
        n = len(self.tasks)
        return [max(self.accuracy[i][j] for i in range(j, n - 1)) - self.accuracy[n - 1][j]
                for j in range(n - 1)]

    def table(self) -> str:
        """The accuracy matrix as text: one row per task learnt, one column per task."""
        width = max([len(t) for t in self.tasks] + [8])
        head = " " * (width + 7) + "".join(f"{t:>{width + 2}}" for t in [*self.tasks, "average"])
        rows = [f"{self.method} accuracy (rows: after learning the task; columns: on the task)", head]
        for i, name in enumerate(self.tasks):
            cells = "".join(f"{'-':>{width + 2}}" if math.isnan(a) else f"{a:>{width + 2}.4f}"
                            for a in self.accuracy[i])
            rows.append(f"after {name:<{width}} " + cells + f"{self.average_accuracy(i):>{width + 2}.4f}")
        if len(self.tasks) > 1:
            cells = "".join(f"{f:>{width + 2}.4f}" for f in self.forgetting())
            rows.append(f"{'forgetting':<{width + 7}}" + cells)
        return "\n".join(rows)


def task_accuracy(model: nn.Module, data: Iterable, columns: slice, *, ignore_index: int = -100) -> float:
    """Task-aware accuracy: the argmax of ``model(inputs)[..., columns]`` against the global
    labels minus ``columns.start``, over labelled rows (eval mode, no graph; the model's
    train/eval mode is restored)."""
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    was = model.training
    model.eval()
    right = total = 0
    try:
        with torch.no_grad():
            for batch in data:
                inputs, labels = unpack(move_to(batch, device), "task_accuracy")
                if labels is None:
                    raise ValueError("task_accuracy: an evaluation batch has no labels")
                local = _local_labels("task_accuracy", labels, columns.start, columns.stop, ignore_index)
                pred = _call(model, inputs)[..., columns].argmax(-1)
                counted = local != ignore_index
                right += int((pred == local)[counted].sum())
                total += int(counted.sum())
    finally:
        model.train(was)
    if total == 0:
        raise ValueError("task_accuracy: the evaluation data has no labelled rows")
    return right / total


def learn_tasks(model: MultiHeadNet, tasks: Sequence[Task], *, method: str = "lwf", temperature: float = 2.0,
                lwf_weight: float = 1.0, warmup_epochs: int = 0,
                eval_fn: Callable[[MultiHeadNet, Task, slice], float] | None = None, backend: str = "kdfast",
                ignore_index: int = -100, **distiller_options: Any) -> LifelongResult:
    """Learn ``tasks`` one after another with learning without forgetting (``"lwf"``) or
    the fine-tuning baseline (``"finetune"``), evaluating every task seen after each.

    For each task: with ``"lwf"``, a snapshot of ``model`` is taken (a frozen deep copy,
    the teacher) when it already has heads; a head is added (:meth:`MultiHeadNet.add_head`), and the
    model is trained with :class:`kdfast.train.Distiller` (``distiller_options``:
    ``epochs``, ``lr``, ...) on the task's data:

    * with no earlier head (the first task of a fresh model): cross-entropy on the new
      head's columns;
    * ``"lwf"``: :class:`Lifelong` (all parameters train);
    * ``"finetune"``: cross-entropy on the new head's columns, backbone and new head
      training, the old heads frozen (the paper's fine-tuning baseline: old task
      parameters unchanged).

    With ``warmup_epochs > 0`` every task after the first starts with LwF's warm-up: that
    many epochs training the new head alone on frozen features (backbone in eval mode, so
    batch-norm statistics do not move either; old heads unused). A ``checkpoint_dir``
    gets one sub-folder per task (``task<i>``, ``task<i>_warmup``). Heads the model has
    before the first task are old heads from the start (e.g. an original task's head).

    Args:
        model: the network, modified in place.
        tasks: the task sequence (names unique, data labelled with global class indices).
        method: ``"lwf"`` or ``"finetune"``.
        temperature, lwf_weight: of :class:`Lifelong`.
        warmup_epochs: epochs of new-head-only training before each later task.
        eval_fn: ``eval_fn(model, task, columns) -> float``; default: task-aware accuracy on
            ``task.eval_data`` (:func:`task_accuracy`).
        backend, ignore_index: see :class:`DistillMode`.
        distiller_options: keyword arguments of :class:`kdfast.train.Distiller`.

    Returns:
        :class:`LifelongResult` (accuracy matrix, average accuracy, forgetting).

    Example::

        >>> from torch.utils.data import DataLoader, TensorDataset
        >>> def task(name, classes, offset):
        ...     x, y = torch.randn(64, 8), torch.randint(offset, offset + classes, (64,))
        ...     return kdfast.train.Task(name, classes, DataLoader(TensorDataset(x, y), batch_size=16),
        ...                              DataLoader(TensorDataset(x, y), batch_size=64))
        >>> net = kdfast.train.MultiHeadNet(torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU()), 16)
        >>> result = kdfast.train.learn_tasks(net, [task("a", 3, 0), task("b", 2, 3)], progress=False)
        >>> len(result.accuracy), net.head_classes
        (2, [3, 2])
    """
    from kdfast.train.distiller import Distiller

    fn = "learn_tasks"
    if not isinstance(model, MultiHeadNet):
        raise TypeError(f"{fn}: model must be a MultiHeadNet, got {type(model).__name__}")
    method = check_choice(fn, "method", method, METHODS)
    check_real(fn, "temperature", temperature, low=0.0, low_open=True)
    check_real(fn, "lwf_weight", lwf_weight, low=0.0)
    check_choice(fn, "backend", backend, BACKENDS)
    if isinstance(warmup_epochs, bool) or not isinstance(warmup_epochs, int) or warmup_epochs < 0:
        raise ValueError(f"{fn}: warmup_epochs must be an int >= 0, got {warmup_epochs!r}")
    if eval_fn is not None and not callable(eval_fn):
        raise TypeError(f"{fn}: eval_fn must be callable, got {type(eval_fn).__name__}")
    for key in ("mode", "teacher", "teachers"):
        if key in distiller_options:
            raise TypeError(f"{fn}: {key}= is chosen per task; it cannot be given")
    _check_tasks(tasks, need_eval=eval_fn is None)
    folder = distiller_options.pop("checkpoint_dir", None)

    def options(sub: str, **extra: Any) -> dict[str, Any]:
        out = {**distiller_options, **extra}
        if folder is not None:
            out["checkpoint_dir"] = Path(os.fspath(folder)) / sub
        return out

    first_head = len(model.heads)
    n = len(tasks)
    accuracy = [[math.nan] * n for _ in range(n)]
    fits = []
    for i, task in enumerate(tasks):
        teacher = copy.deepcopy(model) if len(model.heads) and method == "lwf" else None
        old_heads = model.head_classes
        head = model.add_head(task.num_classes)
        cols = model.task_slice(head)
        if warmup_epochs and len(old_heads):
            _warm_up(model, head, task, cols, ignore_index, options(f"task{i}_warmup", epochs=warmup_epochs))
        if teacher is not None:
            mode: DistillMode = Lifelong(teacher, old_heads=old_heads, temperature=temperature,
                                         lwf_weight=lwf_weight, backend=backend, ignore_index=ignore_index)
        else:
            mode = _NewTaskCE(cols, cols.start, cols.stop, ignore_index=ignore_index)
        frozen = [p for h in model.heads[:head] for p in h.parameters() if p.requires_grad] \
            if method == "finetune" else []
        for p in frozen:
            p.requires_grad_(False)
        try:
            fits.append(Distiller(model, mode, **options(f"task{i}")).fit(task.train_data))
        finally:
            for p in frozen:
                p.requires_grad_(True)
        for j in range(i + 1):
            seen = tasks[j]
            columns = model.task_slice(first_head + j)
            accuracy[i][j] = float(eval_fn(model, seen, columns) if eval_fn is not None else
                                   task_accuracy(model, seen.eval_data, columns, ignore_index=ignore_index))
    return LifelongResult([t.name for t in tasks], method, accuracy, fits)


def _warm_up(model: MultiHeadNet, head: int, task: Task, cols: slice, ignore_index: int,
             options: dict[str, Any]) -> None:
    """Train only ``model.heads[head]`` on the backbone's frozen features (eval mode, no graph)."""
    from kdfast.train.distiller import Distiller

    backbone = model.backbone
    was = backbone.training

    def on_features(new_head: nn.Module, inputs: Any) -> torch.Tensor:
        with torch.no_grad():
            feats = model.features(inputs)
        return new_head(feats)

    backbone.eval()
    try:
        mode = _NewTaskCE(None, cols.start, cols.stop, ignore_index=ignore_index, forward=on_features)
        Distiller(model.heads[head], mode, **options).fit(task.train_data)
    finally:
        backbone.train(was)


def _check_tasks(tasks: Sequence[Task], *, need_eval: bool) -> None:
    fn = "learn_tasks"
    if isinstance(tasks, Task) or not isinstance(tasks, Sequence) or not tasks:
        raise ValueError(f"{fn}: tasks must be a non-empty sequence of Task, got {tasks!r}")
    names = set()
    for i, task in enumerate(tasks):
        if not isinstance(task, Task):
            raise TypeError(f"{fn}: tasks[{i}] must be a Task, got {type(task).__name__}")
        if not isinstance(task.name, str) or task.name in names:
            raise ValueError(f"{fn}: tasks[{i}].name must be a str unique in the sequence, got {task.name!r}")
        names.add(task.name)
        c = task.num_classes
        if isinstance(c, bool) or not isinstance(c, int) or c < 1:
            raise ValueError(f"{fn}: task {task.name!r}: num_classes must be an int >= 1, got {c!r}")
        try:
            empty = len(task.train_data) == 0  # type: ignore[arg-type]
        except TypeError:
            empty = False                      # checked by the Distiller on its first batch
        if empty:
            raise ValueError(f"{fn}: task {task.name!r} has no training batches")
        if need_eval and task.eval_data is None:
            raise ValueError(f"{fn}: task {task.name!r} has no eval_data; give one or an eval_fn")
