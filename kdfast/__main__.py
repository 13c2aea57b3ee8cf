"""Command line of kdfast: ``python -m kdfast {demo,bench,info,cache,distill}`` (console script ``kdfast``).

Examples::

    python -m kdfast demo                      # distillation modes vs baselines on real digits (~5 min)
    python -m kdfast info                      # build facts of the installed kdfast
    python -m kdfast bench --quick             # smoke benchmark of kd_loss, seconds
    python -m kdfast bench --out results/cpu   # full kd_loss benchmark on this machine
    python -m kdfast bench --op dkd --quick    # another op: feature_loss, attention_transfer, dkd, sparse_kd
    python -m kdfast bench --op all            # every op, one folder
    python -m kdfast bench --op cache --quick  # the teacher cache: bytes/token, build, student epoch
    python -m kdfast cache info out/cache      # a teacher cache (also: cache build, cache verify)
    python -m kdfast distill --config examples/configs/soft.yaml --set train.max_steps=100
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence


def _info(args: argparse.Namespace) -> int:
    import torch

    import kdfast

    info = kdfast.build_info()
    info["cuda_available"] = torch.cuda.is_available()
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    info["torch_threads"] = torch.get_num_threads()
    if args.json:
        print(json.dumps(info, indent=2, default=str))
    else:
        width = max(len(k) for k in info)
        for key, value in info.items():
            print(f"{key:<{width}}  {value}")
    return 0


def _bench(args: argparse.Namespace) -> int:
    from kdfast import bench
    from kdfast.bench import common

    benches = bench.load_all()
    selected = common.selected_benches(args, benches)
    if selected:
        common.run(selected, args, known=benches)
    if any(name in (args.op or []) for name in ("cache", "all")):
        from kdfast.bench import cache

        cache.run(args)
    return 0


def _demo(args: argparse.Namespace) -> int:
    from kdfast import demo

    return demo.run(args)


def _distill(args: argparse.Namespace) -> int:
    from kdfast.train import config

    return config.run_cli(args)


def build_parser() -> argparse.ArgumentParser:
    from kdfast import bench as benchmarks
    from kdfast.bench import common

    benches = benchmarks.load_all()
    parser = argparse.ArgumentParser(
        prog="kdfast", description="kdfast: fused knowledge-distillation losses for PyTorch.",
        epilog="Run `kdfast <command> --help` for a command's options.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{demo,bench,info,cache,distill}")

    from kdfast import demo as demo_module

    demo = sub.add_parser(
        "demo", help="distillation modes beside their baselines on real digit images (about 3 min, 2 cores)",
        description="A one-line kernel self-check, then students trained with and without each distillation "
                    "mode on MNIST / scikit-learn digits with pretrained teachers; prints the table and "
                    "writes results.md, results.json and demo.png. Exits non-zero if the self-check fails.")
    demo_module.add_arguments(demo)
    demo.set_defaults(func=_demo)

    bench = sub.add_parser(
        "bench", help="benchmark kdfast's losses against eager PyTorch, torch.compile and Liger-Kernel",
        description="Benchmark of kdfast's fused losses against eager PyTorch and torch.compile (and "
        "Liger-Kernel for kd_loss), side by side in one run: time, peak extra memory, achieved "
        f"bandwidth, the loss checked against a reference. --op picks the op(s) (default "
        f"{benches[0].name}); each op's shapes and options are listed below. Writes <op>.csv, <op>.md "
        "(table, notes, targets) and <op>.png per op, and machine.json, into --out.")
    common.add_arguments(bench, benches, select=True, separate=benchmarks.SEPARATE)
    from kdfast.bench import cache as cache_bench

    cache_bench.add_arguments(bench.add_argument_group("--op cache", cache_bench.SUMMARY))
    bench.set_defaults(func=_bench)

    info = sub.add_parser("info", help="print kdfast.build_info() and the torch / device setup")
    info.add_argument("--json", action="store_true", help="print JSON")
    info.set_defaults(func=_info)

    from kdfast.cache import cli as cache_cli

    cache_cli.add_parser(sub)

    from kdfast.train import config as config_module

    distill = sub.add_parser(
        "distill", help="train a student as a configuration file says (models, data, mode, optimizer)",
        description="Distil a student from a configuration file: models from a registry of small built-in "
                    "ones or by import path, data, the mode and its options, optimizer, schedule, loop and "
                    "output folder; --set overrides values. Writes config.json, checkpoints/, student.pt and "
                    "metrics.json into output.dir. Runs under torchrun too (rank 0 writes).")
    config_module.add_arguments(distill)
    distill.set_defaults(func=_distill)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m kdfast`` and of the ``kdfast`` console script."""
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
