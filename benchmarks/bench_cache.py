#!/usr/bin/env python3
"""Benchmark the teacher cache (kdfast.cache): bytes per token, build overhead, student epoch.

A thin wrapper around ``kdfast.bench.cache`` (the same code as ``python -m kdfast
bench --op cache``); by default it writes into ``benchmarks/results/<device>-<machine>/``.

    python benchmarks/bench_cache.py                           # full run on this machine
    python benchmarks/bench_cache.py --quick --out /tmp/cache  # smoke run, seconds
    python benchmarks/bench_cache.py --help
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # run from a checkout without installing

from kdfast.bench import cache, common  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    return cache.main(argv, default_out=common.machine_folder(HERE / "results"))


if __name__ == "__main__":
    sys.exit(main())
