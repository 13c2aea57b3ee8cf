"""Batch conventions of the training layer.

A batch is whatever the data loader yields; the layer understands three shapes of it:

* a tuple or list ``(inputs, labels, *rest)`` or ``(inputs,)`` (labels ``None``);
* a mapping with the keys ``"inputs"`` and optionally ``"labels"`` (other keys are kept);
* for the domain-adaptation modes, a mapping ``{"source": batch, "target": batch}`` of two
  such batches (:func:`kdfast.train.paired` builds it from two loaders).

``inputs`` is a tensor (the model is called as ``model(inputs)``) or a mapping of tensors
(called as ``model(**inputs)``, e.g. a tokenizer's output). Labels are integer class
indices; rows without a label carry ``ignore_index`` (``-100``).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

__all__ = ["call_model", "move_to", "paired", "unpack"]


def move_to(batch: Any, device: torch.device | str | None, non_blocking: bool = False) -> Any:
    """``batch`` with every tensor moved to ``device`` (nested tuples, lists, mappings and
    objects with a ``.to`` method, such as a cache's ``TeacherBatch``); ``None``: unchanged."""
    if device is None:
        return batch
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=non_blocking)
    if isinstance(batch, Mapping) and not hasattr(batch, "to"):
        return type(batch)({k: move_to(v, device, non_blocking) for k, v in batch.items()})
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):          # namedtuple
        return type(batch)(*(move_to(v, device, non_blocking) for v in batch))
    if isinstance(batch, (tuple, list)):
        return type(batch)(move_to(v, device, non_blocking) for v in batch)
    if hasattr(batch, "to") and callable(batch.to):
        return batch.to(device, non_blocking=non_blocking)
    return batch


def unpack(batch: Any, where: str = "batch") -> tuple[Any, torch.Tensor | None]:
    """``(inputs, labels)`` of a batch (labels ``None`` when it has none)."""
    if isinstance(batch, Mapping):
        if "inputs" not in batch:
            raise ValueError(f"{where}: a mapping batch needs an 'inputs' key (and optionally "
                             f"'labels'), got keys {sorted(batch)}")
        return batch["inputs"], batch.get("labels")
    if isinstance(batch, (tuple, list)):
        if len(batch) == 0:
            raise ValueError(f"{where}: empty batch")
        return batch[0], (batch[1] if len(batch) > 1 else None)
    if isinstance(batch, torch.Tensor):
        return batch, None
    raise TypeError(f"{where}: a batch must be a tensor, a tuple/list (inputs, labels, ...) or "
                    f"a mapping with 'inputs', got {type(batch).__name__}")


def batch_size(inputs: Any) -> int:
    """Number of samples of ``inputs`` (first dimension of its first tensor)."""
    if isinstance(inputs, torch.Tensor):
        return inputs.shape[0]
    if isinstance(inputs, Mapping):
        for v in inputs.values():
            if isinstance(v, torch.Tensor):
                return v.shape[0]
    raise TypeError(f"cannot tell the batch size of {type(inputs).__name__}")


def logits_of(out: Any, who: str = "the model") -> torch.Tensor:
    """The logits in a model's output: a tensor, a ``.logits`` attribute (Hugging Face
    style) or ``"logits"`` key, or the first element of a tuple / list."""
    if isinstance(out, torch.Tensor):
        return out
    logits = getattr(out, "logits", None)
    if logits is None and isinstance(out, Mapping):
        logits = out.get("logits")
    if logits is None and isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        logits = out[0]
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"{who} returned {type(out).__name__}; expected a logits tensor, an object "
                        "with .logits, or a tuple whose first element is the logits")
    return logits


def call_model(model: nn.Module, inputs: Any) -> torch.Tensor:
    """``model(**inputs)`` for a mapping, ``model(inputs)`` otherwise, and the logits of
    its output (:func:`logits_of`)."""
    return logits_of(model(**inputs) if isinstance(inputs, Mapping) else model(inputs))


class paired(Iterable):
    """Zip a labelled source loader with a target loader for the domain-adaptation modes.

    Yields ``{"source": source_batch, "target": target_batch}``. One pass lasts
    ``len(target)`` batches (``length="target"``, the default: every target sample once
    per epoch), ``len(source)`` or ``max(...)``; the shorter loader is restarted as often
    as needed (a fresh iterator, so a shuffling loader reshuffles).

    Example::

        >>> src = torch.utils.data.DataLoader(list(zip(torch.randn(10, 3), torch.arange(10) % 2)), 4)
        >>> tgt = torch.utils.data.DataLoader(list(zip(torch.randn(6, 3))), 4)
        >>> [sorted(b) for b in kdfast.train.paired(src, tgt)]
        [['source', 'target'], ['source', 'target']]
    """

    def __init__(self, source: Iterable, target: Iterable, *, length: str = "target") -> None:
        if length not in ("target", "source", "max"):
            raise ValueError(f"paired: length must be 'target', 'source' or 'max', got {length!r}")
        self.source, self.target, self.length = source, target, length

    def __len__(self) -> int:
        ns, nt = len(self.source), len(self.target)  # type: ignore[arg-type]
        return {"target": nt, "source": ns, "max": max(ns, nt)}[self.length]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        n = len(self)
        its = {"source": iter(self.source), "target": iter(self.target)}
        for _ in range(n):
            out = {}
            for key in ("source", "target"):
                try:
                    out[key] = next(its[key])
                except StopIteration:
                    its[key] = iter(getattr(self, key))
                    out[key] = next(its[key])
            yield out


def check_sequence_of_modules(fn: str, name: str, value: Any, *, allow_empty: bool = False
                              ) -> list[nn.Module]:
    """``value`` as a list of modules (a single module becomes a one-element list)."""
    if isinstance(value, nn.Module):
        return [value]
    if not isinstance(value, Sequence) or not all(isinstance(m, nn.Module) for m in value):
        raise TypeError(f"{fn}: {name} must be an nn.Module or a sequence of them, "
                        f"got {type(value).__name__}")
    if not value and not allow_empty:
        raise ValueError(f"{fn}: {name} must not be empty")
    return list(value)
