#!/usr/bin/env python3
"""Benchmark kdfast.dkd_loss (Decoupled KD) against eager PyTorch and torch.compile.

A thin wrapper around ``kdfast.bench.dkd`` (the same code as ``python -m kdfast
bench --op dkd``); by default it writes into ``benchmarks/results/<device>-<machine>/``.

    python benchmarks/bench_dkd.py                         # full run on this machine
    python benchmarks/bench_dkd.py --quick --out /tmp/dkd  # smoke run, seconds
    python benchmarks/bench_dkd.py --help
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # run from a checkout without installing

from kdfast.bench import common, dkd  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    return common.main_for(dkd.BENCH, argv, description=__doc__.split("\n\n")[0],
                           default_out=common.machine_folder(HERE / "results"))


if __name__ == "__main__":
    sys.exit(main())
