"""Adapters that put kdfast distillation inside the trainers people already use.

Each adapter is a thin layer over :mod:`kdfast.train`'s modes and kdfast's losses; its
trainer is an optional dependency, imported only when the adapter is:

- :mod:`kdfast.integrations.hf`: a ``transformers.Trainer`` that distils (sequence
  classification, causal LM), from a teacher model or a teacher cache
  (``pip install 'kdfast[hf]'``);
- :mod:`kdfast.integrations.hf_fused`: causal-LM distillation of Hugging Face models from
  the LM heads' inputs (fused linear losses, no ``[B, L, V]`` logits), also as
  ``DistillationTrainer(fused_linear=True)``;
- :mod:`kdfast.integrations.lightning`: a ``LightningModule`` wrapper for any mode and a
  callback that adds distillation to an existing module (``pip install 'kdfast[lightning]'``).

``torchrun`` / DDP needs no adapter: :class:`kdfast.train.Distiller` runs distributed by
itself (see :mod:`kdfast.train.distributed`), and ``kdfast distill --config run.yaml`` is
the configuration-file front end.
"""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["require"]


def require(module: str, *, extra: str, feature: str) -> ModuleType:
    """Import the optional dependency ``module`` or raise an ``ImportError`` that says how
    to install it (``pip install 'kdfast[<extra>]'``) and what needs it.

    Example::

        >>> require("math", extra="hf", feature="nothing").sqrt(4.0)
        2.0
    """
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ImportError(f"{feature} needs the optional dependency {module!r}, which is not installed "
                          f"({err}); install it with: pip install 'kdfast[{extra}]'") from err
