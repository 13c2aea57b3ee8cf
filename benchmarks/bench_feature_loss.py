#!/usr/bin/env python3
"""Benchmark kdfast.feature_loss (mse / l1 / smooth_l1 / cosine) against eager PyTorch and torch.compile.

A thin wrapper around ``kdfast.bench.feature_loss`` (the same code as ``python -m kdfast
bench --op feature_loss``); by default it writes into ``benchmarks/results/<device>-<machine>/``.

    python benchmarks/bench_feature_loss.py                             # full run on this machine
    python benchmarks/bench_feature_loss.py --quick --out /tmp/feature  # smoke run, seconds
    python benchmarks/bench_feature_loss.py --help
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # run from a checkout without installing

from kdfast.bench import common, feature_loss  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    return common.main_for(feature_loss.BENCH, argv, description=__doc__.split("\n\n")[0],
                           default_out=common.machine_folder(HERE / "results"))


if __name__ == "__main__":
    sys.exit(main())
