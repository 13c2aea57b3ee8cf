"""Benchmarks of kdfast against eager PyTorch, ``torch.compile`` and Liger-Kernel.

``harness`` holds what every op's benchmark shares (timing, peak memory, copy
bandwidth, machine description, CSV / markdown / PNG output); ``kd_loss`` the
cases and providers of :func:`kdfast.kd_loss`. Run ``python -m kdfast bench --help``.

Importing this package imports neither matplotlib nor the benchmarked libraries.
"""

BENCHMARKS = ("kd_loss",)
