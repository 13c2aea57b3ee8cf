"""kdfast: fused, memory-lean knowledge-distillation losses for PyTorch.

Example::

    >>> import torch, kdfast
    >>> student = torch.randn(8, 100, requires_grad=True)
    >>> teacher = torch.randn(8, 100)
    >>> loss = kdfast.kd_loss(student, teacher, temperature=2.0)
    >>> loss.backward()
"""

__version__ = "0.1.0"

from kdfast import ops as _ops  # noqa: F401  (registers fake / autograd for the ops)
from kdfast import reference
from kdfast._extension import build_info, has_extension, has_kernel
from kdfast.attention import AttentionTransferLoss, attention_transfer_loss
from kdfast.dkd import DKDLoss, dkd_loss
from kdfast.feature import FeatureLoss, feature_loss
from kdfast.functional import DIVERGENCES, REDUCTIONS, kd_loss
from kdfast.fused_linear import (
    FusedLinearKDLoss,
    FusedLinearSparseKDLoss,
    fused_linear_kd_loss,
    fused_linear_sparse_kd_loss,
)
from kdfast.hint import HintLoss
from kdfast.losses import KDLoss
from kdfast.relational import PKTLoss, RKDLoss, SPLoss, pkt_loss, rkd_loss, sp_loss
from kdfast.sparse import SparseKDLoss, sample_logits, sparse_kd_loss, topk_logits

__all__ = [
    "DIVERGENCES",
    "REDUCTIONS",
    "AttentionTransferLoss",
    "DKDLoss",
    "FeatureLoss",
    "FusedLinearKDLoss",
    "FusedLinearSparseKDLoss",
    "HintLoss",
    "KDLoss",
    "PKTLoss",
    "RKDLoss",
    "SPLoss",
    "SparseKDLoss",
    "attention_transfer_loss",
    "build_info",
    "dkd_loss",
    "feature_loss",
    "fused_linear_kd_loss",
    "fused_linear_sparse_kd_loss",
    "has_extension",
    "has_kernel",
    "kd_loss",
    "pkt_loss",
    "reference",
    "rkd_loss",
    "sample_logits",
    "sp_loss",
    "sparse_kd_loss",
    "topk_logits",
]


def __getattr__(name: str):
    # kdfast.cache and kdfast.train are imported on first use: `import kdfast` stays light
    if name in ("cache", "train"):
        import importlib

        return importlib.import_module(f"kdfast.{name}")
    raise AttributeError(f"module 'kdfast' has no attribute {name!r}")
