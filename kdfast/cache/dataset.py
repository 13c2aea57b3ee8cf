"""Training from a teacher cache: :class:`CachedDataset` yields ``(inputs, targets,
teacher_outputs)`` and collates them into padded batches; :class:`TeacherBatch` holds
the decoded teacher side and computes the distillation loss against a student."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from types import ModuleType
from typing import Any

import torch

from kdfast.cache.reader import CachedOutputs, TeacherCache


@dataclass
class TeacherBatch:
    """Decoded, padded teacher outputs of a batch.

    Token layout: ``indices`` / ``values`` ``[B, L, K]`` with ``L`` the longest sample
    (or ``pad_to``), rows past a sample's ``lengths[b]`` padded with index ``-1`` and
    value 0; sample layout: ``[B, K]`` and ``lengths`` None. ``indices`` is int64
    (None for a dense cache, whose ``values`` are logits ``[..., V]``); ``values`` are
    ``values_kind``: ``"logprobs"``, ``"probs"`` or ``"logits"``. ``features``:
    ``{name: [B, ...]}`` (per-token features ``[B, L, ...]``, zero-padded; their names
    are in ``token_features``). ``vocab_size``: the teacher's ``V`` (None when unknown).
    """

    indices: torch.Tensor | None
    values: torch.Tensor
    lengths: torch.Tensor | None
    values_kind: str
    temperature: float
    features: dict = field(default_factory=dict)
    token_features: tuple = ()
    vocab_size: int | None = None

    @property
    def mask(self) -> torch.Tensor | None:
        """``[B, L]`` bool, True on the rows that hold teacher outputs (None in the sample layout)."""
        if self.lengths is None:
            return None
        seq = self.values.shape[1]
        return torch.arange(seq, device=self.lengths.device) < self.lengths[:, None]

    def to(self, device: torch.device | str, non_blocking: bool = False) -> TeacherBatch:
        def move(t):
            return None if t is None else t.to(device, non_blocking=non_blocking)
        return replace(self, indices=move(self.indices), values=move(self.values), lengths=move(self.lengths),
                       features={k: move(v) for k, v in self.features.items()})

    def pin_memory(self) -> TeacherBatch:
        """Pinned copies (``DataLoader(pin_memory=True)`` calls this)."""
        def pin(t):
            return None if t is None else t.pin_memory()
        return replace(self, indices=pin(self.indices), values=pin(self.values), lengths=pin(self.lengths),
                       features={k: pin(v) for k, v in self.features.items()})

    def loss(self, student_logits: torch.Tensor, labels: torch.Tensor | None = None, *,
             temperature: float | None = None, ignore_index: int = -100, losses: ModuleType | None = None,
             **kwargs: Any) -> torch.Tensor:
        """The distillation loss of ``student_logits`` against this teacher batch:
        :func:`kdfast.sparse_kd_loss` (top-k / sampled; ``values`` set to match) or
        :func:`kdfast.kd_loss` (dense), at the cache's temperature unless given.
        ``losses`` is where those two functions come from: ``kdfast`` (the default) or
        :mod:`kdfast.reference` (the plain-PyTorch references, same math).

        ``student_logits``: ``[B, L', V]`` (token layout, ``L' >= L``: rows past the
        teacher's are padding) or ``[B, V]``. Padded rows are skipped (their labels are
        set to ``ignore_index``, so ``batchmean`` counts only real rows). ``kwargs`` go
        to the loss (``alpha``, ``tail``, ``reduction``, ...).

        Example::

            >>> loss = batch.loss(student(x), labels=y, alpha=0.1, tail="residual")
        """
        if losses is None:
            import kdfast as losses

        temperature = self.temperature if temperature is None else temperature
        indices, values = self.indices, self.values
        mask = self.mask
        if mask is not None:
            if student_logits.dim() != 3 or student_logits.shape[0] != values.shape[0]:
                raise ValueError(f"TeacherBatch.loss: student_logits must be [B, L, V] with B = "
                                 f"{values.shape[0]}, got {list(student_logits.shape)}")
            seq, mine = student_logits.shape[1], values.shape[1]
            if seq < mine:
                raise ValueError(f"TeacherBatch.loss: the student has {seq} positions per sample, the "
                                 f"teacher batch {mine}; the student's rows must cover the teacher's")
            if seq > mine:
                extra = seq - mine
                values = torch.nn.functional.pad(values, (0, 0, 0, extra))
                if indices is not None:
                    indices = torch.nn.functional.pad(indices, (0, 0, 0, extra), value=-1)
                mask = torch.nn.functional.pad(mask, (0, extra), value=False)
            if labels is None:
                if kwargs.get("alpha", 0.0):
                    raise ValueError("TeacherBatch.loss: alpha > 0 needs labels")
                # labels only to skip the padded rows (alpha is 0: no cross-entropy)
                labels = torch.zeros(mask.shape, dtype=torch.int64, device=student_logits.device)
            labels = labels.masked_fill(~mask.to(labels.device), ignore_index)
        if indices is None:
            return losses.kd_loss(student_logits, values.to(student_logits.device), labels,
                                  temperature=temperature, ignore_index=ignore_index, **kwargs)
        return losses.sparse_kd_loss(student_logits, indices.to(student_logits.device),
                                     values.to(student_logits.device), labels, values=self.values_kind,
                                     temperature=temperature, ignore_index=ignore_index, **kwargs)


def collate_teacher(items: Sequence[CachedOutputs], *, dtype: torch.dtype = torch.float32,
                    pad_to: int | None = None) -> TeacherBatch:
    """Decodes and pads the outputs of several samples (``cache[i]`` for each ``i`` of a
    batch) into a :class:`TeacherBatch`; ``pad_to`` fixes the padded length of the
    token layout (default: the longest sample).

    Example::

        >>> batch = collate_teacher([cache[i] for i in range(8)])
        >>> batch.indices.shape            # [8, L, k]
    """
    if not items:
        raise ValueError("collate_teacher: no items")
    codec = items[0].codec
    if any(it.codec != codec for it in items):
        raise ValueError("collate_teacher: the items come from caches with different storage")
    decoded = [it.decode(dtype) for it in items]
    names = list(items[0].features)
    if codec.layout == "sample":
        indices = None if codec.kind == "dense" else torch.stack([d[0] for d in decoded])
        values = torch.stack([d[1] for d in decoded])
        feats = {n: torch.stack([it.features[n].to(dtype) for it in items]) for n in names}
        return TeacherBatch(indices, values, None, codec.values, codec.temperature, feats,
                            codec.token_features, codec.vocab_size)
    lengths = torch.tensor([d[1].shape[0] for d in decoded], dtype=torch.int64)
    seq = int(lengths.max()) if pad_to is None else pad_to
    if pad_to is not None and int(lengths.max()) > pad_to:
        raise ValueError(f"collate_teacher: pad_to={pad_to} is shorter than a sample "
                         f"({int(lengths.max())} rows)")
    b, width = len(items), decoded[0][1].shape[-1]
    values = torch.zeros((b, seq, width), dtype=dtype)
    indices = None if codec.kind == "dense" else torch.full((b, seq, width), -1, dtype=torch.int64)
    for j, (idx, val) in enumerate(decoded):
        n = val.shape[0]
        values[j, :n] = val
        if indices is not None:
            indices[j, :n] = idx
    feats = {}
    for name in names:
        parts = [it.features[name] for it in items]
        if name in codec.token_features:
            out = torch.zeros((b, seq, *parts[0].shape[1:]), dtype=dtype)
            for j, p in enumerate(parts):
                out[j, :p.shape[0]] = p
            feats[name] = out
        else:
            feats[name] = torch.stack([p.to(dtype) for p in parts])
    return TeacherBatch(indices, values, lengths, codec.values, codec.temperature, feats,
                        codec.token_features, codec.vocab_size)


# ---------------------------------------------------------------------------
# Dataset
# ---------------------------------------------------------------------------


def _pad_stack(values: list, pad: float) -> Any:
    """Stacks tensors, padding every dimension to the largest (variable-length tokens)."""
    first = values[0]
    if first is None:
        return None
    if isinstance(first, torch.Tensor):
        if all(v.shape == first.shape for v in values):
            return torch.stack(values)
        if any(v.dim() != first.dim() for v in values):
            raise ValueError("CachedDataset.collate: items have tensors of different ranks")
        shape = [max(v.shape[d] for v in values) for d in range(first.dim())]
        out = first.new_full((len(values), *shape), pad)
        for j, v in enumerate(values):
            out[(j, *(slice(0, n) for n in v.shape))] = v
        return out
    if isinstance(first, Mapping):
        return {k: _pad_stack([v[k] for v in values], _key_pad(k, pad)) for k in first}
    if isinstance(first, (tuple, list)):
        return type(first)(_pad_stack(list(col), pad) for col in zip(*values))
    from torch.utils.data import default_collate

    return default_collate(values)


def _key_pad(key: str, pad: float) -> float:
    return {"attention_mask": 0, "labels": -100}.get(key, pad)


class CachedDataset(torch.utils.data.Dataset):
    """A dataset paired with the teacher cache built from it: item ``i`` is
    ``(inputs, targets, teacher_outputs)``, where ``teacher_outputs = cache[i]``.

    ``dataset[i]`` may be ``(inputs, targets)``, ``(inputs,)`` / a tensor (targets
    None) or a dict (its ``"labels"`` are the targets, the rest the inputs). Use
    :meth:`collate` as the DataLoader's ``collate_fn`` (or :meth:`loader`): inputs and
    targets are stacked, padding variable lengths with ``input_pad`` / ``target_pad``
    (an ``attention_mask`` with 0), and the teacher side becomes a :class:`TeacherBatch`.

    Example::

        >>> data = CachedDataset(dataset, TeacherCache.open("cache/", temperature=2.0))
        >>> for x, y, teacher in data.loader(batch_size=8, shuffle=True):
        ...     loss = teacher.loss(student(x), labels=y, alpha=0.1)
    """

    def __init__(self, dataset: Any, cache: TeacherCache | str, *, input_pad: float = 0,
                 target_pad: float = -100, dtype: torch.dtype = torch.float32) -> None:
        if not isinstance(cache, TeacherCache):
            cache = TeacherCache.open(cache)
        if len(dataset) != len(cache):
            raise ValueError(f"CachedDataset: the dataset has {len(dataset)} samples but the cache "
                             f"{cache.path} "
                             f"holds {len(cache)}; it must be the dataset the cache was built from")
        self.dataset, self.cache = dataset, cache
        self.input_pad, self.target_pad, self.dtype = input_pad, target_pad, dtype

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> tuple:
        item = self.dataset[i]
        if isinstance(item, Mapping):
            inputs, targets = {k: v for k, v in item.items() if k != "labels"}, item.get("labels")
        elif isinstance(item, (tuple, list)):
            if len(item) not in (1, 2):
                raise ValueError(f"CachedDataset: dataset items must be (inputs, targets) or (inputs,), got "
                                 f"a {type(item).__name__} of {len(item)}")
            inputs, targets = item[0], item[1] if len(item) == 2 else None
        else:
            inputs, targets = item, None
        return inputs, targets, self.cache[i]

    def collate(self, batch: Sequence[tuple]) -> tuple:
        """``[(inputs, targets, CachedOutputs), ...]`` -> ``(inputs, targets, TeacherBatch)``."""
        inputs = _pad_stack([b[0] for b in batch], self.input_pad)
        targets = _pad_stack([b[1] for b in batch], self.target_pad)
        teacher = collate_teacher([b[2] for b in batch], dtype=self.dtype)
        return inputs, targets, teacher

    def loader(self, **kwargs: Any) -> torch.utils.data.DataLoader:
        """A ``DataLoader`` over this dataset with :meth:`collate` (``kwargs``: batch_size,
        shuffle, num_workers, ...)."""
        kwargs.setdefault("collate_fn", self.collate)
        return torch.utils.data.DataLoader(self, **kwargs)
