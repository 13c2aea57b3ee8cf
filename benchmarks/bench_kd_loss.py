#!/usr/bin/env python3
"""Benchmark kdfast.kd_loss against eager PyTorch, torch.compile and Liger-Kernel.

A thin wrapper around ``kdfast.bench.kd_loss`` (the same code as ``python -m kdfast
bench``); by default it writes into ``benchmarks/results/<device>-<machine>/``.

    python benchmarks/bench_kd_loss.py                        # full run on this machine
    python benchmarks/bench_kd_loss.py --quick --out /tmp/kd  # smoke run, seconds
    python benchmarks/bench_kd_loss.py --help
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # run from a checkout without installing

from kdfast.bench import common, kd_loss  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    return common.main_for(kd_loss.BENCH, argv, description=__doc__.split("\n\n")[0],
                           default_out=common.machine_folder(HERE / "results"))


if __name__ == "__main__":
    sys.exit(main())
