"""Distillation inside a Hugging Face ``transformers.Trainer``.

:class:`DistillationTrainer` is a ``Trainer`` whose loss is kdfast distillation from a
live teacher model (the ``soft`` / ``hard`` modes of :mod:`kdfast.train`) or from a
:mod:`kdfast.cache` teacher cache (the ``offline`` mode), for sequence classification
and causal language modelling. Everything else is the ``Trainer`` as usual:
``TrainingArguments`` (gradient accumulation, ``bf16`` / ``fp16``, ``torch_compile``,
clipping, schedules, checkpoints), data collators, callbacks, evaluation.

:func:`distillation_loss` is the same loss as a function, for a ``Trainer`` subclass of
one's own (or any loop over Hugging Face models). For causal LMs,
``DistillationTrainer(..., fused_linear=True)`` and the functions of
:mod:`kdfast.integrations.hf_fused` compute it from the LM heads' inputs, chunk by chunk,
without the ``[B, L, V]`` logits.

Rows. A *row* is one prediction: a sample for sequence classification, a position for
causal LM. For causal LM the logits at position ``i`` predict token ``i + 1``, so the
labels are shifted by one (``labels[:, 1:]``) and the last position predicts nothing;
positions whose shifted label is ``ignore_index`` (``-100``: padding, or prompt tokens
masked out by the collator) are neither distilled nor counted. With no labels, the
positions the ``attention_mask`` keeps (the token and the next one) are distilled. For
classification every sample is distilled; samples labelled ``-100`` are unlabelled and
get only the teacher's signal.

The loss, per mode (``T`` the temperature, ``a`` = ``alpha``)::

    soft / offline: (1 - a) * T^2 * D(p_teacher || q_student)   over the rows
                    + a * CE(student, labels)                    over the labelled rows
    hard:           CE(student, teacher argmax)  (true labels preferred, rows below
                    ``threshold`` skipped)

``D`` and the cross-entropy are kdfast's (:func:`kdfast.kd_loss`,
:func:`kdfast.sparse_kd_loss` for top-k / sampled caches) through the modes' own methods.

Gradient accumulation: each term is averaged over its rows in the *whole* accumulated
batch (all micro-batches of one optimizer step), so ``gradient_accumulation_steps=2``
with half the per-device batch trains like one batch twice the size, padding included.

Several processes (``torchrun`` / ``accelerate launch``, DDP): with the ``Trainer``'s
default ``average_tokens_across_devices=True`` the row counts are summed over all
processes as well, so each term is the mean over the *global* batch however the rows
(tokens) fall on the processes, and each process's loss is scaled by the process count,
which DDP's averaging of the gradients undoes (as the ``Trainer`` does for its own loss
with ``num_items_in_batch``). ``N`` processes with ``per_device_train_batch_size=b``
then take the steps of one process with batch ``N * b`` on the same samples, and the
logged ``loss`` / ``kd_loss`` / ``ce_loss`` are those of the global batch. With
``average_tokens_across_devices=False`` each process normalises by its own rows (one
fewer collective per step; the steps are then exact only when every process has as many
rows as the others).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from kdfast.cache import TeacherBatch, TeacherCache, collate_teacher
from kdfast.integrations import require
from kdfast.train._batch import logits_of
from kdfast.train.modes import DistillMode, Hard, Offline, Soft, make_mode

transformers = require("transformers", extra="hf", feature="kdfast.integrations.hf")

__all__ = ["TASKS", "DistillationTrainer", "count_rows", "distillation_loss", "infer_task", "select_rows"]

TASKS = ("sequence_classification", "causal_lm")
_SUPPORTED = (Soft, Hard, Offline)
_OPTION_MODES = {"temperature": ("soft", "offline"), "alpha": ("soft", "offline"),
                 "divergence": ("soft",), "beta": ("soft",), "softcap": ("soft",),
                 "threshold": ("hard",), "use_labels": ("hard",), "tail": ("offline",)}


# --------------------------------------------------------------------------- rows and counts


def infer_task(model: nn.Module) -> str:
    """``"causal_lm"`` or ``"sequence_classification"`` from ``model``'s class name (e.g.
    ``GPT2LMHeadModel``, ``LlamaForCausalLM``, ``BertForSequenceClassification``), else
    from ``model.config.architectures``.

    Example::

        >>> cfg = transformers.GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=32)
        >>> infer_task(transformers.GPT2LMHeadModel(cfg))
        'causal_lm'
    """
    names = [type(model).__name__]
    names += list(getattr(getattr(model, "config", None), "architectures", None) or [])
    for name in names:
        if name.endswith(("ForCausalLM", "LMHeadModel")):
            return "causal_lm"
        if name.endswith("ForSequenceClassification"):
            return "sequence_classification"
    raise ValueError(f"cannot tell the task of a {type(model).__name__}; pass task='causal_lm' or "
                     "task='sequence_classification'")


def _check_task(task: str) -> str:
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS} (or 'auto' for the trainer), got {task!r}")
    return task


def _causal_keep(labels: torch.Tensor | None, attention_mask: torch.Tensor | None,
                 shape: Sequence[int], device: torch.device, ignore_index: int
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(keep [B, L] bool, shifted labels [B, L] or None)`` of a causal-LM batch."""
    if labels is not None:
        if labels.dim() != 2 or tuple(labels.shape) != tuple(shape):
            raise ValueError(f"labels must be [B, L] = {list(shape)} for causal LM, got {list(labels.shape)}")
        shifted = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=ignore_index)
        return shifted != ignore_index, shifted
    if attention_mask is not None:
        if tuple(attention_mask.shape) != tuple(shape):
            raise ValueError(f"attention_mask must be [B, L] = {list(shape)}, got "
                             f"{list(attention_mask.shape)}")
        m = attention_mask.bool()
        keep = torch.nn.functional.pad(m[:, :-1] & m[:, 1:], (0, 1), value=False)
        return keep, None
    keep = torch.ones(tuple(shape), dtype=torch.bool, device=device)
    keep[:, -1] = False
    return keep, None


def select_rows(task: str, student_logits: torch.Tensor, labels: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, *, ignore_index: int = -100
                ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Which rows of ``student_logits`` are distilled, and their labels.

    Args:
        task: ``"causal_lm"`` or ``"sequence_classification"``.
        student_logits: ``[B, L, V]`` (causal LM) or ``[B, C]``.
        labels: ``[B, L]`` token ids with ``ignore_index`` on padding (causal LM,
            unshifted, as Hugging Face collators produce them) or ``[B]`` class ids.
        attention_mask: ``[B, L]``, used for causal LM when there are no labels.

    Returns:
        ``(keep, labels)``: for causal LM ``keep`` is ``[B, L]`` bool (``logits[keep]``
        are the rows) and ``labels`` the shifted labels ``[B, L]`` (``labels[:, i]`` is
        the target of position ``i``; ``None`` without labels); for classification
        ``keep`` is ``None`` (every sample) and ``labels`` as given.

    Example::

        >>> keep, y = select_rows("causal_lm", torch.randn(1, 4, 9), torch.tensor([[5, 6, 7, -100]]))
        >>> keep.tolist(), y.tolist()
        ([[True, True, False, False]], [[6, 7, -100, -100]])
    """
    _check_task(task)
    if task == "causal_lm":
        if student_logits.dim() != 3:
            raise ValueError(f"student_logits must be [B, L, V] for causal LM, got "
                             f"{list(student_logits.shape)}")
        return _causal_keep(labels, attention_mask, student_logits.shape[:2], student_logits.device,
                            ignore_index)
    if student_logits.dim() != 2:
        raise ValueError(f"student_logits must be [B, C] for sequence classification, got "
                         f"{list(student_logits.shape)}")
    if labels is not None and tuple(labels.shape) != (student_logits.shape[0],):
        raise ValueError(f"labels must be [B] = [{student_logits.shape[0]}] class ids for sequence "
                         f"classification, got {list(labels.shape)}")
    return None, labels


def count_rows(task: str, batch: Mapping[str, Any], *, ignore_index: int = -100
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rows, labelled)``: how many rows of ``batch`` (a collated Hugging Face batch:
    ``input_ids``, ``attention_mask``, ``labels``) are distilled and how many of those
    have a label, as 0-dim int64 tensors; :func:`select_rows`'s rows, counted without a
    forward pass. Sums over the micro-batches of one optimizer step are the ``totals``
    of :func:`distillation_loss`.

    Example::

        >>> count_rows("causal_lm", {"labels": torch.tensor([[5, 6, 7, -100]])})
        (tensor(2), tensor(2))
    """
    _check_task(task)
    labels, mask = batch.get("labels"), batch.get("attention_mask")
    if task == "causal_lm":
        ref = labels if labels is not None else mask if mask is not None else batch.get("input_ids")
        if not isinstance(ref, torch.Tensor) or ref.dim() != 2:
            raise ValueError("count_rows: a causal-LM batch needs [B, L] 'labels', 'attention_mask' or "
                             "'input_ids'")
        keep, shifted = _causal_keep(labels, mask, ref.shape, ref.device, ignore_index)
        rows = keep.sum()
        return rows, rows.clone() if shifted is not None else torch.zeros_like(rows)
    ref = next((v for v in batch.values() if isinstance(v, torch.Tensor) and v.dim() >= 1), None)
    if ref is None:
        raise ValueError("count_rows: the batch has no tensor to tell its size")
    rows = torch.tensor(ref.shape[0], device=ref.device)
    if labels is None:
        return rows, torch.zeros_like(rows)
    return rows, (labels != ignore_index).sum()


# --------------------------------------------------------------------------- the loss


def _teacher_rows(teacher: TeacherBatch, keep: torch.Tensor | None, student_logits: torch.Tensor
                  ) -> TeacherBatch:
    """The cached teacher outputs of the kept rows, as a sample-layout batch ``[N, K]``."""
    if keep is None:
        if teacher.lengths is not None:
            raise ValueError("the teacher cache holds per-token outputs but the task is sequence "
                             "classification; build the cache from the classifier (one row per sample)")
        return teacher
    if teacher.lengths is None:
        raise ValueError("the teacher cache holds one row per sample but the task is causal LM; build it "
                         "from the language model (one row per token)")
    seq, have = keep.shape[1], teacher.values.shape[1]
    mask = teacher.mask.to(keep.device)
    values, indices = teacher.values.to(keep.device), teacher.indices
    indices = None if indices is None else indices.to(keep.device)
    if have < seq:
        values = torch.nn.functional.pad(values, (0, 0, 0, seq - have))
        if indices is not None:
            indices = torch.nn.functional.pad(indices, (0, 0, 0, seq - have), value=-1)
        mask = torch.nn.functional.pad(mask, (0, seq - have), value=False)
    elif have > seq:
        if bool(mask[:, seq:].any()):
            raise ValueError(f"the teacher cache holds up to {have} token rows for a sample of this batch, "
                             f"the batch has {seq} positions; the dataset must be the one the cache was "
                             "built from, tokenized alike, and not truncated since")
        values, mask = values[:, :seq], mask[:, :seq]
        indices = None if indices is None else indices[:, :seq]
    if bool((keep & ~mask).any()):
        raise ValueError("a position to distil has no row in the teacher cache (a sample is longer than "
                         "the cache's); the dataset must be the one the cache was built from, tokenized "
                         "alike, and the row index column must point at its samples")
    return TeacherBatch(None if indices is None else indices[keep], values[keep], None,
                        teacher.values_kind, teacher.temperature, {}, (), teacher.vocab_size)


def _check_vocab(student_logits: torch.Tensor, teacher: torch.Tensor | TeacherBatch) -> None:
    sv = student_logits.shape[-1]
    if isinstance(teacher, TeacherBatch):
        tv = teacher.vocab_size
        if tv is None and teacher.indices is None:
            tv = teacher.values.shape[-1]
        what = "the teacher cache"
    else:
        tv, what = teacher.shape[-1], "the teacher"
    if tv is not None and tv != sv:
        raise ValueError(f"{what} has {tv} output classes / vocabulary entries but the student {sv}; "
                         "distillation needs the same vocabulary (tokenizer) in the same order")


def distillation_loss(mode: DistillMode, student_logits: torch.Tensor, teacher: torch.Tensor | TeacherBatch,
                      labels: torch.Tensor | None = None, *, task: str,
                      attention_mask: torch.Tensor | None = None,
                      totals: tuple[torch.Tensor | int, torch.Tensor | int] | None = None
                      ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The distillation loss of a Hugging Face batch with a kdfast mode.

    Args:
        mode: a :class:`kdfast.train.Soft` or :class:`~kdfast.train.Hard` mode (with
            ``teacher`` the teacher's logits) or an :class:`~kdfast.train.Offline` mode
            (with ``teacher`` the batch's :class:`kdfast.cache.TeacherBatch`); its
            options (temperature, alpha, divergence, ...) and backend are used.
        student_logits: ``[B, L, V]`` (causal LM) or ``[B, C]`` (classification).
        teacher: the teacher's logits, same shape as the student's (any float dtype), or
            a teacher-cache batch of the same samples.
        labels: unshifted ``[B, L]`` token labels with ``-100`` on padding, or ``[B]``
            class ids (``-100``: unlabelled); ``None``: distillation only.
        task: ``"causal_lm"`` or ``"sequence_classification"``.
        attention_mask: ``[B, L]``, selects the causal-LM rows when there are no labels.
        totals: ``(rows, labelled)`` over the whole accumulated batch (sums of
            :func:`count_rows` over its micro-batches): each term is then this
            micro-batch's share of the accumulated batch's mean, and the micro-batch
            losses add up to it. ``None``: means over this batch.

    Returns:
        ``(loss, parts)``: the 0-dim loss to back-propagate and its detached components
        ``{"kd": ..., "ce": ...}`` (``"ce"`` only with ``alpha > 0`` and labels), each
        weighted like the loss (``loss = (1 - alpha) * kd + alpha * ce`` summed over
        the micro-batches; for ``hard``, ``loss = kd``).

    Example::

        >>> mode = kdfast.train.make_mode("soft", teacher=teacher, temperature=2.0, alpha=0.5)
        >>> with torch.no_grad():
        ...     t = teacher(input_ids=ids, attention_mask=mask).logits
        >>> out = student(input_ids=ids, attention_mask=mask)
        >>> loss, parts = distillation_loss(mode, out.logits, t, labels, task="causal_lm",
        ...                                 attention_mask=mask)
    """
    if not isinstance(mode, _SUPPORTED):
        raise TypeError(f"mode must be a kdfast.train Soft, Hard or Offline mode, got {type(mode).__name__}")
    if not isinstance(student_logits, torch.Tensor):
        raise TypeError(f"student_logits must be a tensor, got {type(student_logits).__name__}")
    offline = isinstance(mode, Offline)
    if offline and not isinstance(teacher, TeacherBatch):
        raise TypeError(f"the offline mode needs teacher= a kdfast.cache.TeacherBatch, got "
                        f"{type(teacher).__name__}")
    if not offline and not isinstance(teacher, torch.Tensor):
        raise TypeError(f"the {mode.name} mode needs teacher= the teacher's logits (a tensor), got "
                        f"{type(teacher).__name__}")
    _check_vocab(student_logits, teacher)
    if not offline and teacher.shape != student_logits.shape:
        raise ValueError(f"teacher logits {list(teacher.shape)} and student logits "
                         f"{list(student_logits.shape)} differ in shape; they must be outputs on the same "
                         "batch")
    ii = mode.ignore_index
    keep, y = select_rows(task, student_logits, labels, attention_mask, ignore_index=ii)
    s = student_logits if keep is None else student_logits[keep]
    if y is not None and keep is not None:
        y = y[keep]
    if offline:
        t = _teacher_rows(teacher, keep, student_logits)
    else:
        t = teacher if keep is None else teacher[keep]
    n = s.shape[0]
    if n == 0:                                  # nothing to distil (all padding): a zero with a graph
        zero = student_logits.sum() * 0.0
        parts = {"kd": zero.detach()}
        if not isinstance(mode, Hard) and mode.alpha > 0 and y is not None:
            parts["ce"] = zero.detach()         # the same parts as other batches (gathered for the logs)
        return zero, parts
    rows_total, labelled_total = (n, None) if totals is None else totals
    share = n / rows_total if totals is not None else 1.0
    if isinstance(mode, Hard):
        kd = mode.losses.kd_loss(s, t, mode.pseudo_labels(t, y), alpha=1.0, ignore_index=ii) * share
        return kd, {"kd": kd.detach()}
    kd, _ = mode.loss_from_logits(s, None, t) if offline else mode.loss_from_logits(s, t, None)
    kd = kd * share
    loss = (1.0 - mode.alpha) * kd
    parts = {"kd": kd.detach()}
    if mode.alpha > 0 and y is not None:
        ce = mode.cross_entropy(s, y)
        if totals is not None:
            ce = ce * ((y != ii).sum() / torch.as_tensor(labelled_total).clamp_min(1))
        loss = loss + mode.alpha * ce
        parts["ce"] = ce.detach()
    return loss, parts


# --------------------------------------------------------------------------- the trainer


class _Indexed(torch.utils.data.Dataset):
    """``dataset`` with each item's position added under ``column`` (the teacher cache's row)."""

    def __init__(self, dataset: Any, column: str) -> None:
        self.dataset, self.column = dataset, column

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict[str, Any]:
        item = self.dataset[i]
        if not isinstance(item, Mapping):
            raise TypeError(f"DistillationTrainer: with teacher_cache= the train_dataset's items must be "
                            f"dicts (a tokenizer's output), got {type(item).__name__}")
        return {**item, self.column: i}


def _output_size(model: nn.Module, task: str) -> int | None:
    config = getattr(model, "config", None)
    if task == "sequence_classification":
        return getattr(config, "num_labels", None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if isinstance(head, nn.Linear):
        return head.out_features
    return getattr(config, "vocab_size", None)


class DistillationTrainer(transformers.Trainer):
    """A ``transformers.Trainer`` that trains the student ``model`` by kdfast distillation.

    The teacher is a live model (``teacher=``) or a teacher cache (``teacher_cache=``,
    built with :meth:`kdfast.cache.TeacherCache.build` from the same dataset, in the same
    order). Every other argument is the ``Trainer``'s.

    Args:
        model: the student, a Hugging Face ``...ForCausalLM`` / ``...LMHeadModel`` or
            ``...ForSequenceClassification`` (or any module returning ``.logits`` with
            ``task`` given).
        teacher: the teacher model (same vocabulary / classes). It is put in eval mode
            with ``requires_grad=False`` (in place), run under ``torch.no_grad()``, moved
            to the student's device on first use (its dtype is kept: a bfloat16 teacher
            with a float32 student works; a teacher loaded with ``device_map=`` stays
            where it is and gets the inputs there), and is not trained, optimised or saved.
        teacher_cache: a :class:`kdfast.cache.TeacherCache` (or its folder) of the
            ``train_dataset``: row ``i`` of the cache is sample ``i``. Items get their
            index under ``index_column`` automatically (when they do not carry it
            already); evaluation batches must carry it too (a cache of the eval set).
        task: ``"auto"`` (from the model's class), ``"causal_lm"`` or
            ``"sequence_classification"``.
        mode: ``"soft"`` (Hinton's soft labels; with a cache: ``"offline"``),
            ``"hard"`` (the teacher's argmax), ``"offline"``, or a kdfast
            :class:`~kdfast.train.Soft` / :class:`~kdfast.train.Hard` /
            :class:`~kdfast.train.Offline` mode object.
        temperature, alpha, divergence, beta, softcap: options of ``soft`` (and
            ``temperature``, ``alpha`` of ``offline``); see :class:`kdfast.train.Soft`.
            ``None``: the mode's default (``soft``: ``T = 4``, ``alpha = 0.1``).
        threshold, use_labels: options of ``hard`` (:class:`kdfast.train.Hard`).
        tail: option of ``offline`` (:class:`kdfast.train.Offline`).
        backend: ``"kdfast"`` (fused ops) or ``"reference"`` (plain PyTorch).
        index_column: the batch key holding the cache row of each sample.
        fused_linear: causal LM only (``soft`` / ``offline`` modes, top-k or sampled
            caches): compute the loss from the LM heads' inputs with
            :func:`kdfast.fused_linear_kd_loss` / :func:`kdfast.fused_linear_sparse_kd_loss`
            (:mod:`kdfast.integrations.hf_fused`), so the ``[B, L, V]`` logits of the
            student and the teacher never exist; the same loss, gradients, row counting
            and logs. Evaluation then returns the loss only (no logits for metrics).
        chunk_size: rows per chunk with ``fused_linear`` (``None``: from ``V`` and the
            free memory).

    Logged: ``loss`` as usual and, next to it, ``kd_loss`` and ``ce_loss`` (the
    distillation and hard-label parts, weighted so that ``loss = (1 - alpha) * kd_loss
    + alpha * ce_loss``), averaged over each logging interval; with several processes,
    those of the global batch. With ``fused_linear`` and ``alpha > 0`` the two parts
    cost one more pass over the heads without gradients per step (the loss itself is
    one fused call).

    Several processes: each term is normalised by its rows in the global accumulated
    batch (all processes, all micro-batches) when ``average_tokens_across_devices`` is
    on (the default), so a DDP run trains like one process with the whole batch; see
    the module's documentation.

    Example::

        >>> args = transformers.TrainingArguments("out", per_device_train_batch_size=8, max_steps=100,
        ...                                       gradient_accumulation_steps=2, bf16=True)
        >>> trainer = DistillationTrainer(model=student, teacher=teacher, args=args, train_dataset=train,
        ...                               data_collator=collator, temperature=2.0, alpha=0.5)
        >>> trainer.train()
        >>> [row["kd_loss"] for row in trainer.state.log_history if "kd_loss" in row]
    """

    loss_is_scaled_for_ga = True      # compute_loss normalises by the whole accumulated batch

    def __init__(self, model: nn.Module | None = None, args: Any = None, *trainer_args: Any,
                 teacher: nn.Module | None = None, teacher_cache: TeacherCache | str | None = None,
                 task: str = "auto", mode: str | DistillMode = "soft", temperature: float | None = None,
                 alpha: float | None = None, divergence: str | None = None, beta: float | None = None,
                 softcap: float | None = None, threshold: float | None = None, use_labels: bool | None = None,
                 tail: str | None = None, backend: str | None = None, index_column: str = "cache_index",
                 fused_linear: bool = False, chunk_size: int | None = None, **trainer_kwargs: Any) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"DistillationTrainer: model must be the student nn.Module (model_init is not "
                            f"supported), got {type(model).__name__}")
        if not isinstance(index_column, str) or not index_column:
            raise TypeError(f"DistillationTrainer: index_column must be a non-empty str, got "
                            f"{index_column!r}")
        self.task = infer_task(model) if task == "auto" else task
        if self.task not in TASKS:
            raise ValueError(f"DistillationTrainer: task must be 'auto' or one of {TASKS}, got {task!r}")
        options = dict(temperature=temperature, alpha=alpha, divergence=divergence, beta=beta,
                       softcap=softcap, threshold=threshold, use_labels=use_labels, tail=tail,
                       backend=backend)
        options = {k: v for k, v in options.items() if v is not None}
        self.index_column = index_column
        self.teacher_cache: TeacherCache | None = None
        if teacher is not None and teacher_cache is not None:
            raise ValueError("DistillationTrainer: pass teacher= (a live teacher model) or teacher_cache= "
                             "(a kdfast teacher cache), not both")
        if teacher_cache is not None and not isinstance(teacher_cache, TeacherCache):
            if not isinstance(teacher_cache, str):
                raise TypeError(f"DistillationTrainer: teacher_cache must be a kdfast.cache.TeacherCache or "
                                f"its folder, got {type(teacher_cache).__name__}")
            teacher_cache = TeacherCache.open(teacher_cache)
        self.distillation = self._build_mode(mode, teacher, teacher_cache, options)
        self.teacher_cache = teacher_cache
        self.teacher = None if isinstance(self.distillation, Offline) else self.distillation.teacher
        if self.teacher is model:
            raise ValueError("DistillationTrainer: the teacher is the student model itself; pass a separate "
                             "(frozen) teacher")
        self._check_sizes(model)
        self.fused_linear, self.chunk_size = self._check_fused(fused_linear, chunk_size, teacher_cache)
        if teacher_cache is not None:
            trainer_kwargs["train_dataset"] = self._index_dataset(trainer_kwargs.get("train_dataset"),
                                                                  teacher_cache)
        self._window: tuple[torch.Tensor, torch.Tensor] | None = None
        self._scale = 1
        self._part_sums: dict[str, torch.Tensor] = {}
        self._part_steps = 0
        super().__init__(model, args, *trainer_args, **trainer_kwargs)
        if self.fused_linear and self.args.torch_compile:
            raise ValueError("DistillationTrainer: fused_linear=True does not work with torch_compile=True "
                             "(the LM head's input is taken by a forward hook, which compiled code does not "
                             "run)")
        if "loss_is_scaled_for_ga" not in vars(transformers.Trainer) and \
                self.args.gradient_accumulation_steps > 1:
            raise RuntimeError(f"DistillationTrainer: this transformers ({transformers.__version__}) "
                               "has no Trainer.loss_is_scaled_for_ga, so its gradient-accumulation scaling "
                               "cannot be told that the loss is already normalised; upgrade transformers or "
                               "use gradient_accumulation_steps=1")

    # -- set-up ------------------------------------------------------------------------------

    def _build_mode(self, mode: str | DistillMode, teacher: nn.Module | None,
                    cache: TeacherCache | None, options: dict[str, Any]) -> DistillMode:
        fn = "DistillationTrainer"
        if isinstance(mode, DistillMode):
            if not isinstance(mode, _SUPPORTED):
                raise TypeError(f"{fn}: mode must be a Soft, Hard or Offline mode (or 'soft', 'hard', "
                                f"'offline'), got {type(mode).__name__}")
            if options:
                raise ValueError(f"{fn}: {sorted(options)} given with a mode object; set them on the mode")
            if isinstance(mode, Offline):
                if cache is None:
                    raise ValueError(f"{fn}: the offline mode needs teacher_cache=")
            else:
                if cache is not None:
                    raise ValueError(f"{fn}: the {mode.name} mode has a live teacher; teacher_cache= is for "
                                     "the offline mode")
                if teacher is not None and teacher is not mode.teacher:
                    raise ValueError(f"{fn}: teacher= differs from the mode's teacher")
            return mode
        if not isinstance(mode, str):
            raise TypeError(f"{fn}: mode must be 'soft', 'hard', 'offline' or a kdfast mode, got "
                            f"{type(mode).__name__}")
        if teacher is None and cache is None:
            raise ValueError(f"{fn}: pass teacher= (the teacher model) or teacher_cache= (a kdfast teacher "
                             "cache)")
        if cache is not None and mode == "soft":
            mode = "offline"
        if mode not in ("soft", "hard", "offline"):
            raise ValueError(f"{fn}: mode must be 'soft', 'hard' or 'offline', got {mode!r}")
        if (mode == "offline") != (cache is not None):
            need = "teacher_cache=" if mode == "offline" else "teacher= (a live teacher)"
            raise ValueError(f"{fn}: mode {mode!r} needs {need}")
        for name in options:
            if name != "backend" and mode not in _OPTION_MODES[name]:
                raise ValueError(f"{fn}: {name}= is an option of the {' / '.join(_OPTION_MODES[name])} mode, "
                                 f"not of {mode!r}")
        if mode != "offline":
            if not isinstance(teacher, nn.Module):
                raise TypeError(f"{fn}: teacher must be an nn.Module, got {type(teacher).__name__}")
            options["teacher"] = teacher
        return make_mode(mode, **options)

    def _check_sizes(self, model: nn.Module) -> None:
        what = "classes" if self.task == "sequence_classification" else "vocabulary entries"
        mine = _output_size(model, self.task)
        if self.teacher is not None:
            theirs, who = _output_size(self.teacher, self.task), "the teacher"
        else:
            theirs, who = self.teacher_cache.vocab_size, "the teacher cache"
        if mine is not None and theirs is not None and mine != theirs:
            raise ValueError(f"DistillationTrainer: {who} has {theirs} {what} but the student {mine}; "
                             "distillation needs the same vocabulary / classes in the same order")

    def _check_fused(self, fused_linear: Any, chunk_size: Any, cache: TeacherCache | None
                     ) -> tuple[bool, int | None]:
        fn = "DistillationTrainer"
        if not isinstance(fused_linear, bool):
            raise TypeError(f"{fn}: fused_linear must be a bool, got {type(fused_linear).__name__}")
        if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int)
                                       or chunk_size < 1):
            raise ValueError(f"{fn}: chunk_size must be an int >= 1 or None, got {chunk_size!r}")
        if not fused_linear:
            if chunk_size is not None:
                raise ValueError(f"{fn}: chunk_size= is an option of fused_linear=True")
            return False, None
        mode = self.distillation
        if self.task != "causal_lm":
            raise ValueError(f"{fn}: fused_linear=True is for causal LM (the LM head's logits), not "
                             f"{self.task!r}")
        if not isinstance(mode, (Soft, Offline)):
            raise ValueError(f"{fn}: fused_linear=True supports the soft and offline modes, not "
                             f"{mode.name!r}")
        if isinstance(mode, Offline) and mode.pairs:
            raise ValueError(f"{fn}: fused_linear=True does not support the offline mode's feature_pairs")
        if mode.backend != "kdfast":
            raise ValueError(f"{fn}: fused_linear=True computes with kdfast's fused ops; backend="
                             f"{mode.backend!r} is for the loss on full logits")
        if cache is not None and cache.kind == "dense":
            raise ValueError(f"{fn}: fused_linear=True needs a top-k or sampled teacher cache; a dense cache "
                             "stores the teacher's [N, V] logits (use fused_linear=False with it)")
        return True, chunk_size

    def _index_dataset(self, dataset: Any, cache: TeacherCache) -> Any:
        if dataset is None:
            return None
        if not hasattr(dataset, "__len__") or not hasattr(dataset, "__getitem__"):
            raise TypeError("DistillationTrainer: with teacher_cache= the train_dataset must be map-style "
                            "(indexable, the one the cache was built from)")
        if len(dataset) != len(cache):
            raise ValueError(f"DistillationTrainer: the train_dataset has {len(dataset)} samples but the "
                             f"teacher cache {cache.path} holds {len(cache)}; it must be the dataset the "
                             "cache was built from")
        first = dataset[0] if len(dataset) else None
        if isinstance(first, Mapping) and self.index_column in first:
            return dataset
        return _Indexed(dataset, self.index_column)

    def _set_signature_columns_if_needed(self) -> None:
        super()._set_signature_columns_if_needed()
        if self.teacher_cache is not None and self.index_column not in self._signature_columns:
            self._signature_columns.append(self.index_column)    # kept by remove_unused_columns

    # -- the step ----------------------------------------------------------------------------

    def get_batch_samples(self, epoch_iterator: Any, num_batches: int, device: Any) -> tuple[list, Any]:
        """The ``Trainer``'s, plus the row counts of the accumulated batch (one call per
        optimizer step) that :meth:`compute_loss` normalises by: summed over the
        processes too when ``args.average_tokens_across_devices`` is on and there are
        several (one all-gather of two integers)."""
        batch_samples, num_items = super().get_batch_samples(epoch_iterator, num_batches, device)
        if batch_samples:
            ii = self.distillation.ignore_index
            counts = [count_rows(self.task, b, ignore_index=ii) for b in batch_samples]
            rows = torch.stack([sum(c[0] for c in counts), sum(c[1] for c in counts)]).to(device)
            self._scale = 1
            if self.args.average_tokens_across_devices and self.args.world_size > 1:
                # every process's rows: each term is a mean over the global accumulated batch, and
                # each process's loss is scaled by the process count, which DDP's gradient average
                # undoes (as the Trainer does with num_items_in_batch)
                rows = self.accelerator.gather(rows[None]).sum(0)
                same = self.get_tp_size() * self.get_cp_size() * self.get_sp_size()
                if same > 1:                     # ranks that share a batch counted it more than once
                    rows = rows / same
                self._scale = self.accelerator.num_processes // self.get_tp_size()
            self._window = (rows[0], rows[1])
            self._part_steps += 1
        return batch_samples, num_items

    def _teacher_side(self, inputs: dict[str, Any], index: Any, device: torch.device
                      ) -> torch.Tensor | TeacherBatch:
        if self.teacher_cache is not None:
            if index is None:
                raise ValueError(f"DistillationTrainer: the batch has no {self.index_column!r} column (the "
                                 "teacher cache's row of each sample); evaluation with a teacher cache needs "
                                 "eval items carrying it")
            rows = index.tolist() if isinstance(index, torch.Tensor) else list(index)
            return collate_teacher([self.teacher_cache[int(i)] for i in rows]).to(device)
        teacher = self.teacher
        p = next(teacher.parameters(), None)
        if p is not None and p.device != device:
            if getattr(teacher, "hf_device_map", None):       # placed by accelerate (device_map=...): stays
                moved = {k: v.to(p.device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
                return self.distillation.teacher_logits(moved).to(device)
            self.distillation.to(device)           # moves the teacher, keeps its dtype
        return self.distillation.teacher_logits(inputs)

    def compute_loss(self, model: nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> torch.Tensor | tuple[torch.Tensor, Any]:
        """The distillation loss of one (micro-)batch (see :func:`distillation_loss`);
        while training, normalised over the whole accumulated batch (of all processes,
        times the process count, see :meth:`get_batch_samples`)."""
        inputs = dict(inputs)
        labels = inputs.pop("labels", None)
        index = inputs.pop(self.index_column, None)
        training = model.training and self._window is not None
        if self.fused_linear:
            loss, parts = self._fused_loss(model, inputs, labels, index, self._window if training else None)
            outputs = transformers.modeling_outputs.CausalLMOutputWithPast(loss=loss.detach())
        else:
            outputs = model(**inputs)
            logits = logits_of(outputs, "DistillationTrainer: the student")
            teacher = self._teacher_side(inputs, index, logits.device)
            loss, parts = distillation_loss(self.distillation, logits, teacher, labels, task=self.task,
                                            attention_mask=inputs.get("attention_mask"),
                                            totals=self._window if training else None)
        if training:
            if self._scale != 1:
                loss = loss * self._scale
                parts = {k: v * self._scale for k, v in parts.items()}
            for k, v in parts.items():
                self._part_sums[k] = self._part_sums[k] + v if k in self._part_sums else v.clone()
        return (loss, outputs) if return_outputs else loss

    def _fused_loss(self, model: nn.Module, inputs: dict[str, Any], labels: torch.Tensor | None, index: Any,
                    totals: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The loss of :meth:`compute_loss` with ``fused_linear=True``: from the LM heads'
        inputs (:mod:`kdfast.integrations.hf_fused`), never the ``[B, L, V]`` logits. The
        parts are computed while training only (``totals`` given)."""
        from kdfast.integrations import hf_fused

        out = self._fused_call(hf_fused, model, inputs, labels, index, totals)
        return out if totals is not None else (out, {})

    def _fused_call(self, hf_fused: Any, model: nn.Module, inputs: dict[str, Any],
                    labels: torch.Tensor | None, index: Any, totals: Any) -> Any:
        mode, ii = self.distillation, self.distillation.ignore_index
        batch = dict(inputs) if labels is None else {**inputs, "labels": labels}
        common = dict(alpha=mode.alpha, ignore_index=ii, chunk_size=self.chunk_size, totals=totals,
                      return_parts=totals is not None)
        if self.teacher_cache is None:
            device = next((p.device for p in model.parameters()), None)
            p = next(self.teacher.parameters(), None)
            if (device is not None and p is not None and p.device != device
                    and not getattr(self.teacher, "hf_device_map", None)):
                mode.to(device)                    # moves the teacher, keeps its dtype
            return hf_fused.causal_lm_kd_loss(model, self.teacher, batch, temperature=mode.temperature,
                                              divergence=mode.divergence, beta=mode.beta,
                                              softcap=mode.softcap, **common)
        fn = "DistillationTrainer"
        inputs_, _, keep, shifted = hf_fused._batch_inputs(fn, batch, ii)
        teacher = self._teacher_side(inputs_, index, keep.device)
        temperature = teacher.temperature if mode.temperature is None else mode.temperature
        if temperature != teacher.temperature:
            raise ValueError(f"{fn}: temperature={temperature} but the cache stores the teacher's "
                             f"{teacher.values_kind} at T = {teacher.temperature}; use temperature=None or "
                             "build the cache at the temperature wanted")
        if teacher.indices is None:
            raise ValueError(f"{fn}: fused_linear=True needs a top-k or sampled teacher cache, not a "
                             "dense one")
        rows = _teacher_rows(teacher, keep, None)
        s = hf_fused.lm_head_inputs(model, inputs_, fn=fn, who="the student")
        return hf_fused._sparse_loss(fn, s, rows.indices, rows.values.float(), keep, shifted,
                                     values=teacher.values_kind, temperature=temperature, tail=mode.tail,
                                     **common)

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        """The ``Trainer``'s log, with ``kd_loss`` / ``ce_loss`` next to a training ``loss``."""
        if "loss" in logs and self._part_sums and self._part_steps > 0:
            names = sorted(self._part_sums)
            values = torch.stack([self._part_sums[k].float() for k in names])
            values = self.accelerator.gather(values[None]).reshape(-1, len(names)).mean(0) / self._part_steps
            for name, value in zip(names, values.tolist()):
                logs[f"{name}_loss"] = value if math.isfinite(value) else float("nan")
            self._part_sums, self._part_steps = {}, 0
        super().log(logs, *args, **kwargs)
