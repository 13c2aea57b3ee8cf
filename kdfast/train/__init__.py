"""kdfast's training layer: a :class:`Distiller` loop, one object per distillation mode,
and metrics. Every distillation loss inside is a kdfast op.

Example::

    >>> import torch, kdfast
    >>> from torch.utils.data import DataLoader, TensorDataset
    >>> x, y = torch.randn(128, 16), torch.randint(0, 4, (128,))
    >>> teacher, student = torch.nn.Linear(16, 4), torch.nn.Linear(16, 4)
    >>> mode = kdfast.train.Soft(teacher, temperature=4.0, alpha=0.1)
    >>> result = kdfast.train.Distiller(student, mode, epochs=1, progress=False).fit(
    ...     DataLoader(TensorDataset(x, y), batch_size=32), eval_data=DataLoader(TensorDataset(x, y)))
"""

from kdfast.train import metrics
from kdfast.train._batch import move_to, paired, unpack
from kdfast.train.distiller import Distiller, FitResult
from kdfast.train.hooks import FeatureTap, get_module
from kdfast.train.modes import (
    BACKENDS,
    MODES,
    Adversarial,
    Compressed,
    Consistency,
    CrossDomain,
    DistillMode,
    Feature,
    Generation,
    GradientReversal,
    Hard,
    Lifelong,
    LifelongResult,
    MultiHeadNet,
    MultiTeacher,
    Offline,
    Online,
    SelfDistillation,
    Soft,
    StepOutput,
    Supervised,
    Task,
    born_again,
    freeze,
    grad_reverse,
    learn_tasks,
    make_mode,
    sparsity_of,
)

__all__ = [
    "BACKENDS",
    "MODES",
    "Adversarial",
    "Compressed",
    "Consistency",
    "CrossDomain",
    "DistillMode",
    "Distiller",
    "Feature",
    "FeatureTap",
    "FitResult",
    "Generation",
    "GradientReversal",
    "Hard",
    "Lifelong",
    "LifelongResult",
    "MultiHeadNet",
    "MultiTeacher",
    "Offline",
    "Online",
    "SelfDistillation",
    "Soft",
    "StepOutput",
    "Supervised",
    "Task",
    "born_again",
    "freeze",
    "get_module",
    "grad_reverse",
    "learn_tasks",
    "make_mode",
    "metrics",
    "move_to",
    "paired",
    "sparsity_of",
    "unpack",
]
