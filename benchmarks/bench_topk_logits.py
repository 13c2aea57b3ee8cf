#!/usr/bin/env python3
"""Benchmark kdfast.topk_logits against eager PyTorch, torch.compile and one read of the logits.

A thin wrapper around ``kdfast.bench.topk_logits`` (the same code as ``python -m kdfast
bench --op topk_logits``); by default it writes into ``benchmarks/results/<device>-<machine>/``.

    python benchmarks/bench_topk_logits.py                          # full run on this machine
    python benchmarks/bench_topk_logits.py --quick --out /tmp/topk_logits   # smoke run, seconds
    python benchmarks/bench_topk_logits.py --help
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # run from a checkout without installing

from kdfast.bench import common, topk_logits  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    return common.main_for(topk_logits.BENCH, argv, description=__doc__.split("\n\n")[0],
                           default_out=common.machine_folder(HERE / "results"))


if __name__ == "__main__":
    sys.exit(main())
