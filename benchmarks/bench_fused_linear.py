#!/usr/bin/env python3
"""Benchmark kdfast.fused_linear_kd_loss (LM-head products and KD loss chunk by chunk) against
unfused kdfast.kd_loss, eager PyTorch, torch.compile and Liger-Kernel's fused linear JSD.

A thin wrapper around ``kdfast.bench.fused_linear`` (the same code as ``python -m kdfast
bench --op fused_linear``); by default it writes into ``benchmarks/results/<device>-<machine>/``.

    python benchmarks/bench_fused_linear.py --dtypes fp32 --modes fwd+bwd   # CPU run on this machine
    python benchmarks/bench_fused_linear.py --dtypes bf16                   # GPU run
    python benchmarks/bench_fused_linear.py --quick --out /tmp/fused-linear # smoke run, seconds
    python benchmarks/bench_fused_linear.py --help
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # run from a checkout without installing

from kdfast.bench import common, fused_linear  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    return common.main_for(fused_linear.BENCH, argv, description=__doc__.split("\n\n")[0],
                           default_out=common.machine_folder(HERE / "results"))


if __name__ == "__main__":
    sys.exit(main())
