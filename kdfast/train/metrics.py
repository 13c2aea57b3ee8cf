"""Evaluation metrics for classifiers and language models, streamed over batches.

- :func:`accuracy`, :func:`topk_accuracy`, :func:`precision_recall_f1`,
  :func:`expected_calibration_error`, :func:`agreement`: one call on one set of outputs.
- :class:`MetricTracker`: the same metrics (plus the mean cross-entropy) accumulated over
  many batches in memory ``O(C + n_bins)``, whatever the number of rows.
- :func:`evaluate`: runs a model (and optionally its teacher) over a loader into a tracker.
- :func:`format_table`: a Markdown or plain-text table of several runs' metrics.

Conventions shared by every function here:

- ``logits`` have shape ``[..., C]`` in float16, bfloat16, float32 or float64; the leading
  dimensions are flattened into rows, and ``labels`` have the leading shape ``[...]``.
  Math runs in float32 (float64 for float64 logits); sums are kept in int64 / float64.
- A row whose label equals ``ignore_index`` is not counted by any metric.
- A metric with no counted row is ``float('nan')``.
- The prediction of a row is its argmax, the lowest class index among equal maxima; top-k
  ranks break ties the same way, so ``top1_accuracy == accuracy`` always.
- Large inputs are processed in chunks of rows, so temporaries stay near 16 MiB.

Example::

    >>> import torch
    >>> from kdfast.train.metrics import MetricTracker
    >>> tracker = MetricTracker(10, topk=(1, 5))
    >>> for _ in range(3):
    ...     tracker.update(torch.randn(32, 10), torch.randint(0, 10, (32,)))
    >>> sorted(tracker.compute())
    ['accuracy', 'ece', 'f1', 'nll', 'precision', 'recall', 'top1_accuracy', 'top5_accuracy']
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, Callable

import torch
from torch import nn

from kdfast._args import FLOAT_DTYPES

__all__ = [
    "MetricTracker",
    "accuracy",
    "agreement",
    "evaluate",
    "expected_calibration_error",
    "format_table",
    "precision_recall_f1",
    "topk_accuracy",
]

# rows per chunk = this // C: bounds the [rows, C] temporaries (16 MiB in float32)
_CHUNK_ELEMENTS = 1 << 22


# ----------------------------------------------------------------------------- argument checks


def _is_integer(dtype: torch.dtype) -> bool:
    return not (dtype.is_floating_point or dtype.is_complex or dtype == torch.bool)


def _check_int(value: Any, arg: str, fn: str, *, minimum: int, maximum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{fn}: {arg} must be an int, got {type(value).__name__}")
    value = int(value)
    if value < minimum or (maximum is not None and value > maximum):
        bound = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
        raise ValueError(f"{fn}: {arg} must be {bound}, got {value}")
    return value


def _check_ignore_index(ignore_index: Any, fn: str) -> int:
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
        raise TypeError(f"{fn}: ignore_index must be an int, got {type(ignore_index).__name__}")
    return int(ignore_index)


def _check_scores(x: Any, arg: str, fn: str, *, predictions_ok: bool = False) -> torch.Tensor:
    """Float logits ``[..., C]`` with C >= 1 (or, when ``predictions_ok``, integer predictions)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{fn}: {arg} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype in FLOAT_DTYPES:
        if x.dim() == 0:
            raise ValueError(f"{fn}: {arg} must have shape [..., C], got a 0-dim tensor")
        if x.shape[-1] < 1:
            raise ValueError(f"{fn}: {arg} must have at least one class (last dim >= 1), "
                             f"got shape {list(x.shape)}")
        return x
    if predictions_ok and _is_integer(x.dtype):
        return x
    expected = ("float logits [..., C] or integer predictions [...]" if predictions_ok
                else "float16, bfloat16, float32 or float64 logits")
    raise TypeError(f"{fn}: {arg} must be {expected}, got {x.dtype}")


def _check_same(x: torch.Tensor, ref: torch.Tensor, arg: str, ref_arg: str, fn: str,
                shape: torch.Size | None = None, what: str = "the shape") -> None:
    """``x`` must have ``shape`` (default: ``ref``'s shape) and be on ``ref``'s device."""
    shape = ref.shape if shape is None else shape
    if x.shape != shape:
        raise ValueError(f"{fn}: {arg} must have shape {list(shape)} ({what} of {ref_arg}), "
                         f"got {list(x.shape)}")
    if x.device != ref.device:
        raise ValueError(f"{fn}: {arg} must be on {ref.device} like {ref_arg}, got {x.device}")


def _check_indices(values: torch.Tensor, arg: str, fn: str, num_classes: int | None,
                   ignore_index: int | None = None) -> None:
    """Every entry of ``values`` (other than ``ignore_index``) must lie in [0, num_classes)."""
    bad = values < 0 if num_classes is None else (values < 0) | (values >= num_classes)
    if ignore_index is not None:
        bad &= values != ignore_index
    if bool(bad.any()):
        bound = "0" if num_classes is None else f"[0, {num_classes})"
        relation = ">=" if num_classes is None else "in"
        also = "" if ignore_index is None else f" or equal ignore_index={ignore_index}"
        raise ValueError(f"{fn}: {arg} must be {relation} {bound}{also}, "
                         f"got {int(values[bad].reshape(-1)[0])}")


def _check_labels(labels: Any, scores: torch.Tensor, shape: torch.Size, num_classes: int | None,
                  ignore_index: int, fn: str, what: str) -> torch.Tensor:
    """Integer labels of ``shape`` on ``scores``' device, in range; returned flat as int64."""
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"{fn}: labels must be a torch.Tensor, got {type(labels).__name__}")
    if not _is_integer(labels.dtype):
        raise TypeError(f"{fn}: labels must be an integer tensor, got {labels.dtype}")
    _check_same(labels, scores, "labels", "logits", fn, shape, what)
    flat = labels.reshape(-1).long()
    _check_indices(flat, "labels", fn, num_classes, ignore_index)
    return flat


def _logits_and_labels(logits: Any, labels: Any, ignore_index: Any,
                       fn: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Checked float logits and labels -> ``(logits [N, C], labels [N] int64, counted [N] bool)``."""
    ignore_index = _check_ignore_index(ignore_index, fn)
    x = _check_scores(logits, "logits", fn)
    num_classes = x.shape[-1]
    y = _check_labels(labels, x, x.shape[:-1], num_classes, ignore_index, fn, "the leading shape")
    return x.reshape(-1, num_classes), y, y != ignore_index


def _predictions_and_labels(logits: Any, labels: Any, ignore_index: Any, num_classes: int | None,
                            fn: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int | None]:
    """Float logits ``[..., C]`` or integer predictions ``[...]``, and their labels ->
    ``(predictions [N] int64, labels [N] int64, counted [N] bool, C or None)``. C is
    ``num_classes`` when given, else the logits' last dim, else None (predictions)."""
    ignore_index = _check_ignore_index(ignore_index, fn)
    x = _check_scores(logits, "logits", fn, predictions_ok=True)
    if num_classes is not None:
        num_classes = _check_int(num_classes, "num_classes", fn, minimum=1)
    if x.dtype.is_floating_point:
        if num_classes is not None and num_classes != x.shape[-1]:
            raise ValueError(f"{fn}: num_classes must equal the last dim of logits "
                             f"({x.shape[-1]}), got {num_classes}")
        num_classes = x.shape[-1]
        y = _check_labels(labels, x, x.shape[:-1], num_classes, ignore_index, fn, "the leading shape")
        pred = x.reshape(-1, num_classes).argmax(-1)
    else:
        y = _check_labels(labels, x, x.shape, num_classes, ignore_index, fn, "the shape")
        pred = x.reshape(-1).long()
        _check_indices(pred, "logits (integer predictions)", fn, num_classes)
    return pred, y, y != ignore_index, num_classes


# ----------------------------------------------------------------------------- shared math


def _ratio(numerator: torch.Tensor | float, denominator: torch.Tensor | float) -> float:
    denominator = float(denominator)
    return float(numerator) / denominator if denominator > 0 else math.nan


def _counted_chunks(counted: torch.Tensor, *tensors: torch.Tensor) -> Iterator[list[torch.Tensor]]:
    """The counted rows of ``tensors`` (each ``[N, ...]``), a chunk at a time; float16 and
    bfloat16 are raised to float32 (float32 / float64 are kept)."""
    width = max(t.shape[-1] if t.dim() == 2 else 1 for t in tensors)
    step = max(1, _CHUNK_ELEMENTS // width)
    for start in range(0, counted.numel(), step):
        rows = counted[start:start + step]
        chunk = [t[start:start + step][rows] for t in tensors]
        yield [t.float() if t.dtype in (torch.float16, torch.bfloat16) else t for t in chunk]


def _label_ranks(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """0-based rank of each row's label in ``x [n, C]``: the classes scoring higher, plus those
    scoring the same with a lower index (the order argmax and a stable descending sort use)."""
    score = x.gather(1, y[:, None])
    lower = torch.arange(x.shape[1], device=x.device) < y[:, None]
    return (x > score).sum(1) + ((x == score) & lower).sum(1)


def _class_counts(pred: torch.Tensor, y: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``[3, C]`` int64: true positives, predicted rows and labelled rows of each class."""
    return torch.stack([torch.bincount(y[pred == y], minlength=num_classes),
                        torch.bincount(pred, minlength=num_classes),
                        torch.bincount(y, minlength=num_classes)])


def _macro_prf(counts: torch.Tensor, classes: torch.Tensor) -> tuple[float, float, float]:
    """Macro precision, recall and F1 over ``classes`` (bool ``[C]``) from ``_class_counts``; a
    class whose ratio has a zero denominator scores 0 (sklearn's ``zero_division=0``)."""
    tp, predicted, labelled = counts.to("cpu", torch.float64)
    if labelled.sum() == 0 or not bool(classes.any()):
        return math.nan, math.nan, math.nan
    classes = classes.cpu()

    def mean_of(num: torch.Tensor, den: torch.Tensor) -> float:
        per_class = torch.where(den > 0, num / den.clamp(min=1), torch.zeros_like(num))
        return float(per_class[classes].mean())

    return mean_of(tp, predicted), mean_of(tp, labelled), mean_of(2 * tp, predicted + labelled)


def _max_prob_and_lse(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Argmax, max softmax probability (float64) and logsumexp of each row of ``x [n, C]``."""
    top, pred = x.max(1)
    total = torch.exp(x - top[:, None]).sum(1)  # the max contributes exp(0) = 1: exact ties
    return pred, total.reciprocal().double(), top + total.log()


def _calibration_bins(confidence: torch.Tensor, correct: torch.Tensor, n_bins: int) -> torch.Tensor:
    """``[3, n_bins]`` float64 per-bin row count, confidence sum and correct count; bin m
    holds confidences in ``(m / n_bins, (m + 1) / n_bins]``."""
    inner_edges = torch.arange(1, n_bins, dtype=torch.float64, device=confidence.device) / n_bins
    bins = torch.bucketize(confidence, inner_edges)  # right=False: edges[i-1] < c <= edges[i]
    one_hot = (bins[:, None] == torch.arange(n_bins, device=bins.device)).double()
    stats = torch.stack([torch.ones_like(confidence), confidence, correct.double()])
    return stats @ one_hot  # a matmul, not bincount(weights=): deterministic on CUDA


def _calibration_error(bins: torch.Tensor) -> float:
    """ECE = sum over bins of |correct - confidence sum| / rows (from ``_calibration_bins``)."""
    rows, confidence, correct = bins.to("cpu", torch.float64)
    return _ratio((correct - confidence).abs().sum(), rows.sum())


# ----------------------------------------------------------------------------- functional metrics


def accuracy(logits: torch.Tensor, labels: torch.Tensor, *, ignore_index: int = -100) -> float:
    """Fraction of counted rows whose prediction equals the label.

    Args:
        logits: ``[..., C]`` float logits (prediction = argmax, the lowest index among ties),
            or ``[...]`` integer predictions (each >= 0).
        labels: ``[...]`` integer labels in ``[0, C)`` or equal to ``ignore_index``.
        ignore_index: label of rows that are not counted.

    Returns:
        The accuracy in [0, 1]; ``nan`` when no row is counted.

    Example::

        >>> import torch
        >>> logits = torch.tensor([[2.0, 0.5, 0.1], [0.2, 0.3, 1.5], [1.0, 3.0, 0.0]])
        >>> accuracy(logits, torch.tensor([0, 2, 0]))
        0.6666666666666666
        >>> accuracy(torch.tensor([0, 1, 1]), torch.tensor([0, -100, 2]))
        0.5
    """
    pred, y, counted, _ = _predictions_and_labels(logits, labels, ignore_index, None, "accuracy")
    return _ratio(((pred == y) & counted).sum(), counted.sum())


def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, k: int = 5, *,
                  ignore_index: int = -100) -> float:
    """Fraction of counted rows whose label is among the ``k`` highest logits.

    The label's rank counts the classes with a higher logit plus those with an equal logit
    and a lower index, so ``k=1`` equals :func:`accuracy`; without ties this is sklearn's
    ``top_k_accuracy_score``.

    Args:
        logits: ``[..., C]`` float logits.
        labels: ``[...]`` integer labels in ``[0, C)`` or equal to ``ignore_index``.
        k: ``1 <= k <= C``.
        ignore_index: label of rows that are not counted.

    Returns:
        The top-k accuracy in [0, 1]; ``nan`` when no row is counted.

    Example::

        >>> import torch
        >>> logits = torch.tensor([[0.1, 0.5, 0.4], [0.7, 0.2, 0.1]])
        >>> topk_accuracy(logits, torch.tensor([2, 2]), k=2)
        0.5
    """
    fn = "topk_accuracy"
    x, y, counted = _logits_and_labels(logits, labels, ignore_index, fn)
    k = _check_int(k, "k", fn, minimum=1, maximum=x.shape[1])
    hits = sum(int((_label_ranks(xc, yc) < k).sum()) for xc, yc in _counted_chunks(counted, x, y))
    return _ratio(hits, counted.sum())


def precision_recall_f1(logits: torch.Tensor, labels: torch.Tensor, *, num_classes: int | None = None,
                        ignore_index: int = -100) -> tuple[float, float, float]:
    """Macro-averaged precision, recall and F1 over the counted rows.

    Per class c: precision = TP / predicted, recall = TP / labelled,
    F1 = 2 TP / (predicted + labelled); a zero denominator scores 0. Each of the three is the
    plain mean of the per-class values over:

    - all classes ``0 .. num_classes - 1`` when ``num_classes`` is given, including classes
      that are neither labelled nor predicted (they score 0 and pull the mean down);
    - otherwise, the classes that appear among the counted labels or predictions.

    This is sklearn's ``precision_recall_fscore_support(average="macro", zero_division=0)``
    with ``labels=range(num_classes)``, respectively with its default ``labels``. F1 is the
    mean of per-class F1, not the F1 of the mean precision and recall.

    Args:
        logits: ``[..., C]`` float logits (prediction = argmax), or ``[...]`` integer
            predictions.
        labels: ``[...]`` integer labels in ``[0, C)`` or equal to ``ignore_index``.
        num_classes: C; must equal the last dim of float logits. Integer predictions must
            be in ``[0, num_classes)`` (>= 0 when None).
        ignore_index: label of rows that are not counted.

    Returns:
        ``(precision, recall, f1)``; all ``nan`` when no row is counted.

    Example::

        >>> import torch
        >>> pred, labels = torch.tensor([0, 0, 1, 2]), torch.tensor([0, 1, 1, 2])
        >>> precision_recall_f1(pred, labels)
        (0.8333333333333334, 0.8333333333333334, 0.7777777777777777)
        >>> precision_recall_f1(pred, labels, num_classes=4)[1]
        0.625
    """
    fn = "precision_recall_f1"
    pred, y, counted, size = _predictions_and_labels(logits, labels, ignore_index, num_classes, fn)
    pred, y = pred[counted], y[counted]
    if size is None:  # integer predictions without num_classes
        size = int(torch.maximum(pred.max(), y.max())) + 1 if y.numel() else 0
    counts = _class_counts(pred, y, size)
    classes = (torch.ones(size, dtype=torch.bool) if num_classes is not None
               else (counts[1] > 0) | (counts[2] > 0))
    return _macro_prf(counts, classes)


def expected_calibration_error(logits: torch.Tensor, labels: torch.Tensor, *, n_bins: int = 15,
                               ignore_index: int = -100) -> float:
    """Expected calibration error of the max softmax probability (Guo et al., 2017).

    The confidence of a row is its max softmax probability, and it is correct when its
    argmax equals its label. Bin m (``0 <= m < n_bins``) holds the rows whose confidence is
    in ``(m / n_bins, (m + 1) / n_bins]`` (equal width, right-inclusive; a confidence is
    always > 0). ``ECE = sum_m |B_m| / n * |accuracy(B_m) - mean confidence(B_m)|``.

    Args:
        logits: ``[..., C]`` float logits.
        labels: ``[...]`` integer labels in ``[0, C)`` or equal to ``ignore_index``.
        n_bins: number of bins, >= 1.
        ignore_index: label of rows that are not counted.

    Returns:
        The ECE in [0, 1]; ``nan`` when no row is counted.

    Example::

        >>> import torch
        >>> logits = torch.zeros(4, 4)           # confidence 1/4, prediction 0
        >>> expected_calibration_error(logits, torch.tensor([0, 1, 2, 3]))
        0.0
        >>> expected_calibration_error(logits, torch.tensor([0, 0, 2, 3]))
        0.25
    """
    fn = "expected_calibration_error"
    x, y, counted = _logits_and_labels(logits, labels, ignore_index, fn)
    n_bins = _check_int(n_bins, "n_bins", fn, minimum=1)
    bins = torch.zeros(3, n_bins, dtype=torch.float64, device=x.device)
    for xc, yc in _counted_chunks(counted, x, y):
        pred, confidence, _ = _max_prob_and_lse(xc)
        bins += _calibration_bins(confidence, pred == yc, n_bins)
    return _calibration_error(bins)


def agreement(student_logits: torch.Tensor, teacher_logits: torch.Tensor, *,
              mask: torch.Tensor | None = None) -> float:
    """Fraction of rows where the student's and the teacher's argmax are the same class.

    Args:
        student_logits: ``[..., C]`` float logits.
        teacher_logits: ``[..., C]`` float logits (any float dtype).
        mask: optional ``[...]`` bool tensor; only rows where it is True are counted.

    Returns:
        The agreement in [0, 1]; ``nan`` when no row is counted.

    Example::

        >>> import torch
        >>> student = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 1.0]])
        >>> teacher = torch.tensor([[3.0, 1.0], [1.0, 0.0], [5.0, 4.0]])
        >>> agreement(student, teacher)
        0.6666666666666666
        >>> agreement(student, teacher, mask=torch.tensor([True, False, True]))
        1.0
    """
    fn = "agreement"
    s = _check_scores(student_logits, "student_logits", fn)
    t = _check_scores(teacher_logits, "teacher_logits", fn)
    _check_same(t, s, "teacher_logits", "student_logits", fn)
    if mask is None:
        counted = torch.ones(s.shape[:-1].numel(), dtype=torch.bool, device=s.device)
    else:
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            got = mask.dtype if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise TypeError(f"{fn}: mask must be a bool tensor or None, got {got}")
        _check_same(mask, s, "mask", "student_logits", fn, s.shape[:-1], "the leading shape")
        counted = mask.reshape(-1)
    num_classes = s.shape[-1]
    same = s.reshape(-1, num_classes).argmax(-1) == t.reshape(-1, num_classes).argmax(-1)
    return _ratio((same & counted).sum(), counted.sum())


# ----------------------------------------------------------------------------- streaming


class MetricTracker:
    """Accumulates classification metrics over batches in memory ``O(C + n_bins)``.

    Each :meth:`update` adds one batch's per-class counts (true positives, predicted and
    labelled rows), top-k hits, calibration-bin sums, cross-entropy sum and argmax agreement
    with a teacher; :meth:`compute` turns the totals into metrics that equal the functional
    ones on all batches concatenated.

    Args:
        num_classes: C, the last dim of every batch's logits.
        topk: the k of each ``top{k}_accuracy`` (an int or a sequence; ``()`` for none),
            each in ``[1, C]``.
        n_bins: calibration bins of the ECE (see :func:`expected_calibration_error`).
        ignore_index: label of rows that are not counted (by any metric, agreement included).

    Example::

        >>> import torch
        >>> tracker = MetricTracker(3, topk=(2,))
        >>> tracker.update(torch.tensor([[2.0, 1.0, 0.0]]), torch.tensor([1]))
        >>> tracker.update(torch.tensor([[0.0, 0.0, 5.0]]), torch.tensor([2]),
        ...                teacher_logits=torch.tensor([[0.0, 1.0, 0.0]]))
        >>> m = tracker.compute()
        >>> m["accuracy"], m["top2_accuracy"], m["agreement"]
        (0.5, 1.0, 0.0)
    """

    def __init__(self, num_classes: int, *, topk: int | Sequence[int] = (5,), n_bins: int = 15,
                 ignore_index: int = -100) -> None:
        fn = "MetricTracker"
        self.num_classes = _check_int(num_classes, "num_classes", fn, minimum=1)
        if isinstance(topk, numbers.Integral) and not isinstance(topk, bool):
            topk = (topk,)
        if isinstance(topk, str) or not isinstance(topk, Sequence):
            raise TypeError(f"{fn}: topk must be an int or a sequence of ints, got {type(topk).__name__}")
        self.topk = tuple(dict.fromkeys(_check_int(k, "topk", fn, minimum=1) for k in topk))
        if any(k > self.num_classes for k in self.topk):
            raise ValueError(f"{fn}: topk must be in [1, num_classes={self.num_classes}] (topk=() for "
                             f"none), got {topk}")
        self.n_bins = _check_int(n_bins, "n_bins", fn, minimum=1)
        self.ignore_index = _check_ignore_index(ignore_index, fn)
        self._sums: dict[str, torch.Tensor] = {}

    def reset(self) -> None:
        """Forgets every batch seen so far."""
        self._sums = {}

    def _add(self, name: str, value: torch.Tensor) -> None:
        if name in self._sums:
            self._sums[name] += value.to(self._sums[name].device)
        else:
            self._sums[name] = value

    def update(self, logits: torch.Tensor, labels: torch.Tensor | None = None,
               teacher_logits: torch.Tensor | None = None) -> None:
        """Adds one batch.

        Args:
            logits: ``[..., C]`` float logits of the model being evaluated.
            labels: ``[...]`` integer labels in ``[0, C)`` or equal to ``ignore_index``; feeds
                every metric but ``agreement``.
            teacher_logits: ``[..., C]`` float logits of a reference model, same device;
                feeds ``agreement`` (over the rows with a counted label when labels are given).
        """
        fn = "MetricTracker.update"
        x = _check_scores(logits, "logits", fn)
        if x.shape[-1] != self.num_classes:
            raise ValueError(f"{fn}: logits must have num_classes={self.num_classes} classes in "
                             f"the last dim, got shape {list(x.shape)}")
        if labels is None and teacher_logits is None:
            raise ValueError(f"{fn}: needs labels, teacher_logits or both, got neither")
        tensors = [x.reshape(-1, self.num_classes)]
        if labels is not None:
            y = _check_labels(labels, x, x.shape[:-1], self.num_classes, self.ignore_index, fn,
                              "the leading shape")
            counted = y != self.ignore_index
            tensors.append(y)
        else:
            counted = torch.ones(tensors[0].shape[0], dtype=torch.bool, device=x.device)
        if teacher_logits is not None:
            t = _check_scores(teacher_logits, "teacher_logits", fn)
            _check_same(t, x, "teacher_logits", "logits", fn)
            tensors.append(t.reshape(-1, self.num_classes))

        device, ks = x.device, torch.tensor(self.topk, dtype=torch.long, device=x.device)
        counts = torch.zeros(3, self.num_classes, dtype=torch.long, device=device)
        hits = torch.zeros(len(self.topk), dtype=torch.long, device=device)
        bins = torch.zeros(3, self.n_bins, dtype=torch.float64, device=device)
        nll = torch.zeros((), dtype=torch.float64, device=device)
        agree = torch.zeros(2, dtype=torch.long, device=device)
        for chunk in _counted_chunks(counted, *tensors):
            xc = chunk[0]
            if labels is not None:
                yc = chunk[1]
                pred, confidence, lse = _max_prob_and_lse(xc)
                counts += _class_counts(pred, yc, self.num_classes)
                if self.topk:
                    hits += (_label_ranks(xc, yc)[:, None] < ks).sum(0)
                bins += _calibration_bins(confidence, pred == yc, self.n_bins)
                nll += (lse - xc.gather(1, yc[:, None]).squeeze(1)).sum(dtype=torch.float64)
            else:
                pred = xc.argmax(1)
            if teacher_logits is not None:
                same = (pred == chunk[-1].argmax(1)).sum()
                agree += torch.stack([same, same.new_tensor(pred.numel())])
        if labels is not None:
            for name, value in (("counts", counts), ("topk", hits), ("bins", bins), ("nll", nll)):
                self._add(name, value)
        if teacher_logits is not None:
            self._add("agree", agree)

    def all_reduce(self) -> None:
        """Sum the totals over the processes of the ``torch.distributed`` group, in place, so
        that :meth:`compute` gives the metrics of every process's batches together (each
        process evaluating its own shard). One collective; a no-op without a group. Call it
        on every process, also on those that saw no batch."""
        from kdfast.train import distributed

        if not distributed.is_distributed():
            return
        import torch.distributed as dist

        c, k, b = self.num_classes, len(self.topk), self.n_bins
        layout = (("counts", (3, c), torch.long), ("topk", (k,), torch.long),
                  ("bins", (3, b), torch.float64), ("nll", (), torch.float64), ("agree", (2,), torch.long))
        device = next((v.device for v in self._sums.values()), torch.device("cpu"))
        if dist.get_backend() == "nccl":
            device = torch.device("cuda", torch.cuda.current_device())
        flags = torch.tensor([float("counts" in self._sums), float("agree" in self._sums)],
                             dtype=torch.float64)
        parts = [flags.to(device)]
        for name, shape, _ in layout:
            value = self._sums.get(name)
            value = torch.zeros(shape, dtype=torch.float64) if value is None else value
            parts.append(value.to(device=device, dtype=torch.float64).reshape(-1))
        flat = torch.cat(parts)
        dist.all_reduce(flat)                 # float64 counts are exact below 2**53
        offset, sums = 2, {}
        for name, shape, dtype in layout:
            n = math.prod(shape)
            sums[name] = flat[offset:offset + n].reshape(shape).to(dtype)
            offset += n
        present = {"counts": flat[0] > 0, "topk": flat[0] > 0, "bins": flat[0] > 0, "nll": flat[0] > 0,
                   "agree": flat[1] > 0}
        self._sums = {name: value for name, value in sums.items() if bool(present[name])}

    def compute(self) -> dict[str, float]:
        """The metrics of all batches since the last :meth:`reset`.

        Returns:
            With labels seen: ``accuracy``, ``top{k}_accuracy`` for each k, ``precision``,
            ``recall``, ``f1`` (macro over all ``num_classes`` classes, see
            :func:`precision_recall_f1`), ``ece`` and ``nll`` (mean cross-entropy of the
            counted rows, natural log). With teacher logits seen: ``agreement``. A metric
            with no counted row is ``nan``; no update at all gives ``{}``.
        """
        out: dict[str, float] = {}
        if "counts" in self._sums:
            counts = self._sums["counts"].cpu()
            rows = counts[2].sum()
            out["accuracy"] = _ratio(counts[0].sum(), rows)
            for k, hits in zip(self.topk, self._sums["topk"].cpu()):
                out[f"top{k}_accuracy"] = _ratio(hits, rows)
            every_class = torch.ones(self.num_classes, dtype=torch.bool)
            out["precision"], out["recall"], out["f1"] = _macro_prf(counts, every_class)
            out["ece"] = _calibration_error(self._sums["bins"])
            out["nll"] = _ratio(self._sums["nll"], rows)
        if "agree" in self._sums:
            same, rows = self._sums["agree"].cpu()
            out["agreement"] = _ratio(same, rows)
        return out


# ----------------------------------------------------------------------------- evaluation loop


def _split_batch(batch: Any, fn: str) -> tuple[Any, Any]:
    if isinstance(batch, Mapping):
        missing = [key for key in ("inputs", "labels") if key not in batch]
        if missing:
            raise ValueError(f"{fn}: a dict batch must have the keys 'inputs' and 'labels', "
                             f"missing {missing}")
        return batch["inputs"], batch["labels"]
    if isinstance(batch, (tuple, list)):
        if len(batch) < 2:
            raise ValueError(f"{fn}: a tuple batch must be (inputs, labels, ...), "
                             f"got {len(batch)} element(s)")
        return batch[0], batch[1]
    raise TypeError(f"{fn}: each batch must be an (inputs, labels, ...) tuple or list, or a dict "
                    f"with 'inputs' and 'labels', got {type(batch).__name__}")


def _to_device(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, Mapping):
        return {key: _to_device(value, device) for key, value in obj.items()}
    if isinstance(obj, (tuple, list)):
        return type(obj)(_to_device(value, device) for value in obj)
    return obj


def _default_forward(model: nn.Module, inputs: Any) -> Any:
    return model(**inputs) if isinstance(inputs, Mapping) else model(inputs)


def _logits_of(output: Any, arg: str, fn: str) -> torch.Tensor:
    logits = output if isinstance(output, torch.Tensor) else getattr(output, "logits", None)
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"{fn}: forward({arg}, inputs) must return a logits tensor or an object "
                        f"with a .logits tensor, got {type(output).__name__}")
    return logits


def evaluate(model: nn.Module, loader: Iterable[Any], *, num_classes: int,
             device: torch.device | str | None = None, teacher: nn.Module | None = None,
             forward: Callable[[nn.Module, Any], Any] | None = None,
             topk: int | Sequence[int] = (5,), sync: bool = False) -> dict[str, float]:
    """Runs ``model`` (and ``teacher``) over ``loader`` in eval mode and returns the metrics.

    Runs under ``torch.inference_mode()`` with every module of ``model`` and ``teacher`` in
    eval mode; each module's previous train/eval mode is restored afterwards, also on error.
    Labels equal to -100 are not counted.

    Args:
        model: the model to evaluate; its logits are ``[..., num_classes]``.
        loader: yields ``(inputs, labels, ...)`` tuples or lists (extra elements ignored) or
            dicts with the keys ``"inputs"`` and ``"labels"``; labels are ``[...]`` integers.
        num_classes: C.
        device: where inputs and labels go (tensors inside dicts, lists and tuples too);
            default: the device of ``model``'s first parameter or buffer, else CPU. The models
            are not moved.
        teacher: optional reference model; adds ``agreement`` (same argmax) to the result.
        forward: ``forward(model, inputs) -> logits`` (or an object with ``.logits``);
            default ``model(**inputs)`` for dict inputs, else ``model(inputs)``.
        topk: the k of each ``top{k}_accuracy``.
        sync: under ``torch.distributed``, each process evaluates its own shard of the
            data and the totals are summed over the processes before the metrics are
            computed (:meth:`MetricTracker.all_reduce`); every process gets the result.

    Returns:
        :meth:`MetricTracker.compute` over all batches.

    Example::

        >>> import torch
        >>> from torch import nn
        >>> model = nn.Linear(4, 3)
        >>> data = [(torch.randn(8, 4), torch.randint(0, 3, (8,))) for _ in range(2)]
        >>> metrics = evaluate(model, data, num_classes=3, topk=(2,), teacher=nn.Linear(4, 3))
        >>> sorted(metrics)
        ['accuracy', 'agreement', 'ece', 'f1', 'nll', 'precision', 'recall', 'top2_accuracy']
    """
    fn = "evaluate"
    if not isinstance(model, nn.Module):
        raise TypeError(f"{fn}: model must be a torch.nn.Module, got {type(model).__name__}")
    if teacher is not None and not isinstance(teacher, nn.Module):
        raise TypeError(f"{fn}: teacher must be a torch.nn.Module or None, got {type(teacher).__name__}")
    if forward is not None and not callable(forward):
        raise TypeError(f"{fn}: forward must be callable or None, got {type(forward).__name__}")
    forward = _default_forward if forward is None else forward
    tracker = MetricTracker(num_classes, topk=topk)
    if device is None:
        tensor = next(iter(model.parameters()), None)
        tensor = next(iter(model.buffers()), None) if tensor is None else tensor
        device = torch.device("cpu") if tensor is None else tensor.device
    device = torch.device(device)

    nets = [model] if teacher is None else [model, teacher]
    modes = [(module, module.training) for net in nets for module in net.modules()]
    batches = 0
    try:
        for net in nets:
            net.eval()
        with torch.inference_mode():
            for batch in loader:
                inputs, labels = (_to_device(part, device) for part in _split_batch(batch, fn))
                logits = _logits_of(forward(model, inputs), "model", fn)
                teacher_logits = None
                if teacher is not None:
                    teacher_logits = _logits_of(forward(teacher, inputs), "teacher", fn).to(logits.device)
                if isinstance(labels, torch.Tensor):
                    labels = labels.to(logits.device)
                tracker.update(logits, labels, teacher_logits)
                batches += 1
    finally:
        for module, training in modes:
            module.training = training
    if sync:
        tracker.all_reduce()
        if not tracker.compute():
            raise ValueError(f"{fn}: the loaders of all processes yielded no batches")
    elif batches == 0:
        raise ValueError(f"{fn}: loader yielded no batches")
    return tracker.compute()


# ----------------------------------------------------------------------------- reporting


def _cell(value: Any, fmt: str, where: str, fn: str) -> str:
    if value is None:
        return "-"
    if isinstance(value, str):
        return value
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return fmt.format(value)
    raise TypeError(f"{fn}: {where} must be a float or a str, got {type(value).__name__}")


def format_table(rows: Mapping[str, Mapping[str, float | str]], columns: Sequence[str] | None = None,
                 *, fmt: str = "{:.4f}", markdown: bool = True) -> str:
    """A table with one line per run: a header row, then each row's name and values.

    Args:
        rows: run name -> {column: value}; numbers are formatted with ``fmt``, strings are
            shown as they are, missing columns (or None) as ``-``.
        columns: the columns in order; default: every key of ``rows``, in first-seen order.
        fmt: ``str.format`` pattern for numbers.
        markdown: a Markdown pipe table (names left-aligned, values right-aligned) when True,
            else space-aligned plain text with a dashed rule under the header.

    Returns:
        The table, lines joined by ``\\n``, without a trailing newline.

    Example::

        >>> print(format_table({"student": {"accuracy": 0.75, "nll": 0.61},
        ...                     "teacher": {"accuracy": 0.8125}}))
        |         | accuracy |    nll |
        |:--------|---------:|-------:|
        | student |   0.7500 | 0.6100 |
        | teacher |   0.8125 |      - |
        >>> print(format_table({"kd": {"f1": 0.5}}, markdown=False, fmt="{:.2f}"))
              f1
        --  ----
        kd  0.50
    """
    fn = "format_table"
    if not isinstance(rows, Mapping):
        raise TypeError(f"{fn}: rows must be a mapping of name -> {{column: value}}, "
                        f"got {type(rows).__name__}")
    for name, row in rows.items():
        if not isinstance(row, Mapping):
            raise TypeError(f"{fn}: rows[{name!r}] must be a mapping of column -> value, "
                            f"got {type(row).__name__}")
    if columns is None:
        columns = list(dict.fromkeys(column for row in rows.values() for column in row))
    elif isinstance(columns, str) or not isinstance(columns, Sequence):
        raise TypeError(f"{fn}: columns must be a sequence of str or None, got {type(columns).__name__}")
    table = [["", *map(str, columns)]]
    table += [[str(name), *(_cell(row.get(column), fmt, f"rows[{name!r}][{column!r}]", fn)
                            for column in columns)] for name, row in rows.items()]
    if markdown:
        table = [[cell.replace("|", "\\|") for cell in line] for line in table]
    widths = [max(len(line[i]) for line in table) for i in range(len(table[0]))]

    def aligned(line: list[str]) -> list[str]:
        return [cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(line, widths))]

    if markdown:
        widths = [max(w, 1) for w in widths]
        rule = "|" + "|".join(":" + "-" * (w + 1) if i == 0 else "-" * (w + 1) + ":"
                              for i, w in enumerate(widths)) + "|"
        lines = ["| " + " | ".join(aligned(line)) + " |" for line in table]
        return "\n".join([lines[0], rule, *lines[1:]])
    lines = ["  ".join(aligned(line)).rstrip() for line in table]
    return "\n".join([lines[0], "  ".join("-" * w for w in widths), *lines[1:]])
