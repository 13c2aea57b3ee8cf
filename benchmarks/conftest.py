"""pytest-benchmark setup for ``benchmarks/``: run with ``pytest benchmarks --benchmark-only``.

The default pytest run (``testpaths = ["tests"]``) never collects this folder.
``--kd-bench-all`` (or ``KDFAST_BENCH_ALL=1``) runs every case of the CLI benchmark
instead of the small default set.
"""

from __future__ import annotations

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def pytest_addoption(parser):
    parser.addoption("--kd-bench-all", action="store_true", default=False,
                     help="kdfast: benchmark every kd_loss case, not the small default set")


def pytest_configure(config):
    if config.getoption("--kd-bench-all"):
        os.environ["KDFAST_BENCH_ALL"] = "1"
