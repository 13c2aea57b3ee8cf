"""Benchmarks of kdfast against eager PyTorch, ``torch.compile`` and Liger-Kernel.

``harness`` holds the measuring instruments and writers every benchmark shares
(timing, peak memory, copy bandwidth, machine description, CSV / markdown / PNG);
``common`` the driver (command line, run, loss check, targets); one module per op
its cases, providers and targets: ``kd_loss``, ``feature_loss``,
``attention_transfer``, ``dkd``, ``topk_logits``, ``sample_logits``, ``sparse_kd``,
``fused_linear`` (the names of :data:`BENCHMARKS`, also the values of ``kdfast bench --op``);
``cache`` benchmarks the teacher cache with its own runner (:data:`SEPARATE`).
Run ``python -m kdfast bench --help``.

Importing this package imports neither matplotlib nor the benchmarked libraries.

Example::

    >>> from kdfast import bench
    >>> [b.op for b in bench.load_all()]
    ['kd_loss', 'feature_loss', 'attention_transfer_loss', 'dkd_loss', 'topk_logits', 'sample_logits',
     'sparse_kd_loss', 'fused_linear_kd_loss']
"""

from __future__ import annotations

import importlib

BENCHMARKS = ("kd_loss", "feature_loss", "attention_transfer", "dkd", "topk_logits", "sample_logits",
              "sparse_kd", "fused_linear")
# benchmarks with their own runner, not a grid of loss providers: kdfast.bench.<name>.run(args)
SEPARATE = ("cache",)


def load(name: str):
    """The :class:`kdfast.bench.common.OpBench` of the benchmark ``name`` (one of :data:`BENCHMARKS`)."""
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; choose from {', '.join(BENCHMARKS)}")
    return importlib.import_module(f"kdfast.bench.{name}").BENCH


def load_all() -> list:
    """Every benchmark's :class:`kdfast.bench.common.OpBench`, in the order of :data:`BENCHMARKS`."""
    return [load(name) for name in BENCHMARKS]
