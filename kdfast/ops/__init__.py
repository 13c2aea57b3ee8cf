"""Python glue of the compiled ops: fake (meta) kernels and autograd formulas.

Each ``kdfast/ops/<op>.py`` registers ``torch.library.register_fake`` and
``torch.library.register_autograd`` for the ``torch.ops.kdfast`` ops of one family,
when the compiled extension is loaded.
"""

from kdfast._extension import has_extension

if has_extension():
    from kdfast.ops import (  # noqa: F401
        attention_transfer,
        dkd,
        feature_loss,
        kd_loss,
        sparse_kd,
        topk_sample,
    )
