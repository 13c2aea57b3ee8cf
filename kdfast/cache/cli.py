"""``kdfast cache build|info|verify``: the teacher cache on the command line.

Examples::

    kdfast cache build out/cache --teacher mymodels:load_teacher --data mydata:train_set \\
        --storage topk --k 64 --temperature 2.0 --batch-size 8
    torchrun --nproc_per_node 8 -m kdfast cache build out/cache ...   # one shard set per rank
    kdfast cache info out/cache
    kdfast cache verify out/cache --temperature 2.0

``--teacher`` / ``--data`` / ``--forward`` name Python objects as ``module:attr`` or
``path/to/file.py:attr``; a teacher or data object that is a plain function (not a
module, dataset or loader) is called without arguments to make it.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import sys
from typing import Any

DTYPES = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}


def load_object(spec: str, what: str) -> Any:
    """The object named by ``module:attr`` or ``file.py:attr`` (``attr`` may be dotted)."""
    if ":" not in spec:
        raise ValueError(f"--{what}: expected module:attr or path/file.py:attr, got {spec!r}")
    source, attr = spec.rsplit(":", 1)
    if source.endswith(".py") or os.sep in source:
        if not os.path.exists(source):
            raise ValueError(f"--{what}: no such file {source!r}")
        name = "_kdfast_cli_" + os.path.splitext(os.path.basename(source))[0]
        module_spec = importlib.util.spec_from_file_location(name, source)
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[name] = module  # so that DataLoader workers and pickling find it
        module_spec.loader.exec_module(module)
    else:
        if os.getcwd() not in sys.path:
            sys.path.insert(0, os.getcwd())
        module = importlib.import_module(source)
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"--{what}: {source} has no attribute {attr!r}")
        obj = getattr(obj, part)
    return obj


def _make(obj: Any, *, keep: tuple) -> Any:
    """``obj`` itself when it is one of ``keep``'s types (or has a length), else ``obj()``."""
    if isinstance(obj, keep) or hasattr(obj, "__len__") or not callable(obj):
        return obj
    return obj()


def _parse_feature(text: str):
    from kdfast.cache import Feature

    per_token = text.endswith(":token")
    if per_token:
        text = text[: -len(":token")]
    name, _, module = text.partition("=")
    return name, Feature(per_token=per_token, module=module or None)


def _storage(args: argparse.Namespace):
    import torch

    from kdfast.cache import Dense, Sampled, TopK

    dtype = getattr(torch, DTYPES[args.dtype])
    if args.storage == "topk":
        return TopK(k=args.k, dtype=dtype)
    if args.storage == "sampled":
        return Sampled(num_samples=args.num_samples)
    return Dense(dtype=dtype)


def _build(args: argparse.Namespace) -> int:
    import torch

    from kdfast.cache import TeacherCache

    teacher = _make(load_object(args.teacher, "teacher"), keep=(torch.nn.Module,))
    data = _make(load_object(args.data, "data"), keep=(torch.utils.data.Dataset, torch.utils.data.DataLoader))
    forward = load_object(args.forward, "forward") if args.forward else None
    features = dict(_parse_feature(f) for f in args.feature) or None
    if args.device:
        teacher = teacher.to(args.device) if isinstance(teacher, torch.nn.Module) else teacher
    started = _init_distributed(args.device)
    try:
        cache = TeacherCache.build(
            args.path, teacher, data, storage=_storage(args), temperature=args.temperature,
            batch_size=args.batch_size, forward=forward, features=features, fingerprint=args.fingerprint,
            seed=args.seed, shard_tokens=args.shard_tokens, progress=not args.no_progress,
            device=args.device, vocab_size=args.vocab_size, overwrite=args.overwrite)
        if cache is not None and _rank() == 0:
            info = cache.info()
            print(f"built {info['path']}: {info['samples']} samples, {info['rows']} rows, "
                  f"{info['bytes'] / 2**20:.1f} MiB ({info['bytes_per_token']:.1f} B/token)")
    finally:
        if started:
            import torch.distributed as dist

            dist.destroy_process_group()
    return 0


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _init_distributed(device: str | None) -> bool:
    """Joins the process group that ``torchrun`` describes (WORLD_SIZE > 1)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    import torch
    import torch.distributed as dist

    if dist.is_initialized():
        return False
    cuda = torch.cuda.is_available() and (device is None or str(device).startswith("cuda"))
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend="nccl" if cuda else "gloo")
    return True


def _open(args: argparse.Namespace):
    from kdfast.cache import TeacherCache

    return TeacherCache.open(args.path, vocab_size=getattr(args, "vocab_size", None),
                             temperature=getattr(args, "temperature", None),
                             fingerprint=getattr(args, "fingerprint", None))


def _info(args: argparse.Namespace) -> int:
    info = _open(args).info()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    storage = dict(info["storage"])
    kind = storage.pop("kind")
    rows = [
        ("path", info["path"]),
        ("storage", f"{kind} " + ", ".join(f"{k}={v}" for k, v in storage.items())),
        ("values", info["values"]),
        ("layout", info["layout"] + (" (token rows per sample)" if info["layout"] == "token"
                                     else " (one row per sample)")),
        ("vocab_size", info["vocab_size"]),
        ("temperature", info["temperature"]),
        ("teacher", info["teacher_fingerprint"]),
        ("seed", info["seed"]),
        ("samples", info["samples"]),
        ("rows", info["rows"]),
        ("shards", info["shards"]),
        ("fields", "; ".join(f"{k}: {v}" for k, v in info["fields"].items())),
        ("size", f"{info['bytes']} bytes ({info['bytes'] / 2**20:.2f} MiB)"),
        ("bytes/token", f"{info['bytes_per_token']:.2f}"),
    ]
    if "bytes_per_entry" in info:
        rows.append(("bytes/entry", f"{info['bytes_per_entry']:.3f} (outputs and their index)"))
    if info["features"]:
        rows.append(("features", "; ".join(f"{n}: {f['dtype']} {f['shape']} per "
                                           f"{'token' if f['per_token'] else 'sample'}"
                                           for n, f in info["features"].items())))
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    return 0


def _verify(args: argparse.Namespace) -> int:
    summary = _open(args).verify()
    print(f"ok: {summary['path']}: {summary['files']} files, {summary['bytes']} bytes match their checksums")
    if summary["other_files"]:
        print(f"(other files in the folder, not part of the cache: {', '.join(summary['other_files'])})")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Adds ``cache`` and its subcommands to the ``kdfast`` command line."""
    cache = sub.add_parser(
        "cache", help="build, describe or verify an on-disk teacher cache",
        description="The on-disk teacher cache (kdfast.cache): build it once from a teacher and a dataset, "
                    "then train students from it.")
    cmds = cache.add_subparsers(dest="cache_command", required=True, metavar="{build,info,verify}")

    b = cmds.add_parser(
        "build", help="run a teacher over a dataset and write the cache (resumes an unfinished build)",
        description="Runs the teacher over the dataset once and writes its outputs. Run it again after a "
                    "crash: it resumes where it stopped. Under torchrun each rank writes its own shards.")
    b.add_argument("path", help="the cache folder")
    b.add_argument("--teacher", required=True, metavar="MODULE:ATTR",
                   help="the teacher nn.Module, or a function returning it (module:attr or file.py:attr)")
    b.add_argument("--data", required=True, metavar="MODULE:ATTR",
                   help="a map-style dataset or unshuffled DataLoader, or a function returning one")
    b.add_argument("--forward", metavar="MODULE:ATTR",
                   help="forward(teacher, batch) -> logits or a dict {'logits', 'mask' | 'lengths', "
                        "'features'} (default: teacher(inputs); dict batches: their attention_mask)")
    b.add_argument("--storage", choices=("topk", "sampled", "dense"), default="topk", help="default topk")
    b.add_argument("--k", type=int, default=64, help="entries per row of --storage topk (default 64)")
    b.add_argument("--num-samples", type=int, default=12,
                   help="draws per row of --storage sampled (default 12)")
    b.add_argument("--dtype", choices=tuple(DTYPES), default="fp16",
                   help="value type of topk / dense (default fp16)")
    b.add_argument("--temperature", type=float, default=1.0, help="default 1.0")
    b.add_argument("--batch-size", type=int, default=None, help="default: the DataLoader's, else 16")
    b.add_argument("--seed", type=int, default=0, help="seed of the sampled draws (default 0)")
    b.add_argument("--shard-tokens", type=int, default=None, help="token rows per shard (default: ~256 MiB)")
    b.add_argument("--feature", action="append", default=[], metavar="NAME[=MODULE][:token]",
                   help="also store a teacher feature: the output of submodule MODULE (else forward's "
                        "features[NAME]), per token with :token; repeatable")
    b.add_argument("--device", default=None, help="where the teacher runs (default: its parameters' device)")
    b.add_argument("--fingerprint", default=None,
                   help="teacher fingerprint (default: sha256 of its state_dict)")
    b.add_argument("--vocab-size", type=int, default=None, help="check the teacher's vocabulary size")
    b.add_argument("--overwrite", action="store_true",
                   help="start afresh: remove the cache in PATH first (any settings, finished or not)")
    b.add_argument("--no-progress", action="store_true", help="no progress bar")

    i = cmds.add_parser("info", help="describe a cache (storage, sizes, bytes per token)")
    i.add_argument("path")
    i.add_argument("--json", action="store_true", help="print JSON")

    v = cmds.add_parser(
        "verify", help="recompute every checksum; exit status 1 if anything is corrupt",
        description="Checks the header, every file's size and sha256, the row offsets and the token ids; "
                    "with --vocab-size / --temperature / --fingerprint also that the cache matches.")
    v.add_argument("path")
    v.add_argument("--vocab-size", type=int, default=None)
    v.add_argument("--temperature", type=float, default=None)
    v.add_argument("--fingerprint", default=None)
    cache.set_defaults(func=run)
    return cache


def run(args: argparse.Namespace) -> int:
    """Runs a parsed ``kdfast cache`` command; errors become a message and exit status 1
    (a corrupt or mismatched cache, a failed build) or 2 (bad arguments)."""
    from kdfast.cache import CacheError

    handler = {"build": _build, "info": _info, "verify": _verify}[args.cache_command]
    try:
        return handler(args)
    except CacheError as exc:
        print(f"kdfast cache {args.cache_command}: error: {exc}", file=sys.stderr)
        return 1
    except (ValueError, TypeError) as exc:
        print(f"kdfast cache {args.cache_command}: error: {exc}", file=sys.stderr)
        return 2
