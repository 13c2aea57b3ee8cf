#!/usr/bin/env python3
"""Benchmark kdfast.sparse_kd_loss (a top-K teacher) against the dense kdfast.kd_loss, eager
PyTorch and torch.compile.

A thin wrapper around ``kdfast.bench.sparse_kd`` (the same code as ``python -m kdfast
bench --op sparse_kd``); by default it writes into ``benchmarks/results/<device>-<machine>/``.

    python benchmarks/bench_sparse_kd.py                               # full run on this machine
    python benchmarks/bench_sparse_kd.py --quick --out /tmp/sparse-kd  # smoke run, seconds
    python benchmarks/bench_sparse_kd.py --help
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # run from a checkout without installing

from kdfast.bench import common, sparse_kd  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    return common.main_for(sparse_kd.BENCH, argv, description=__doc__.split("\n\n")[0],
                           default_out=common.machine_folder(HERE / "results"))


if __name__ == "__main__":
    sys.exit(main())
