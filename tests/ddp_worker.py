"""A distillation run for the distributed tests, launched by ``torchrun`` (or run alone).

Distils a small MLP from an MLP teacher on scikit-learn's bundled 8x8 digits with
:class:`kdfast.train.Distiller`; rank 0 writes ``result.json`` (history, metrics, world
size) and ``student.pt`` into ``--out``. ``--crash-at N`` raises on every rank at step N
(a killed run); ``--resume`` continues from ``--ckpt``. ``--mode offline`` first builds a
top-k teacher cache (one shard set per rank) and trains from it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import kdfast
from kdfast.train import distributed


def digits() -> tuple[TensorDataset, TensorDataset]:
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32) / 16.0
    y = torch.tensor(y, dtype=torch.long)
    return TensorDataset(x[:1440], y[:1440]), TensorDataset(x[1440:], y[1440:])


def teacher_for(train: TensorDataset) -> nn.Module:
    """A deterministic MLP teacher: the same weights on every rank and every run."""
    torch.manual_seed(1234)
    teacher = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    opt = torch.optim.Adam(teacher.parameters(), lr=1e-2)
    x, y = train.tensors
    for _ in range(60):
        opt.zero_grad()
        nn.functional.cross_entropy(teacher(x), y).backward()
        opt.step()
    return teacher.eval()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--ckpt", default=None)
    parser.add_argument("--batch", type=int, default=16, help="per-process batch size")
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--mode", default="soft", choices=("soft", "feature", "offline"))
    parser.add_argument("--save-every", type=int, default=None)
    parser.add_argument("--crash-at", type=int, default=None)
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args(argv)

    torch.set_num_threads(1)
    started = distributed.init_distributed("gloo")
    train, test = digits()
    teacher = teacher_for(train)
    torch.manual_seed(distributed.rank() + 7)      # rank 0's student wins the broadcast
    student = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    loader = DataLoader(train, batch_size=args.batch, shuffle=True)
    if args.mode == "soft":
        mode = kdfast.train.Soft(teacher, temperature=4.0, alpha=0.3)
    elif args.mode == "feature":      # a lazily built regressor, trained and synchronised too
        mode = kdfast.train.Feature(teacher, pairs={"0": "0"}, kind="hint", weight=0.5, temperature=4.0)
    else:
        from kdfast.cache import CachedDataset, TeacherCache, TopK

        cache = TeacherCache.build(Path(args.out) / "cache", teacher, train, storage=TopK(k=4),
                                   temperature=2.0, progress=False, fsync=False)
        loader = CachedDataset(train, cache).loader(batch_size=args.batch, shuffle=True)
        mode = kdfast.train.Offline(alpha=0.2, tail="residual")

    def crash(event: str, distiller: kdfast.train.Distiller, logs: dict) -> None:
        if event == "step" and distiller.step == args.crash_at:
            raise RuntimeError(f"simulated crash at step {distiller.step}")

    distiller = kdfast.train.Distiller(
        student, mode, lr=2e-2, max_steps=args.steps, epochs=100, grad_accum=args.grad_accum,
        log_every=1, progress=False, shard_data=True, checkpoint_dir=args.ckpt,
        save_every=args.save_every, callbacks=[crash])
    result = distiller.fit(loader, eval_data=DataLoader(test, batch_size=50), resume=args.resume)
    if distributed.is_main_process():
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        torch.save(student.state_dict(), out / "student.pt")
        (out / "result.json").write_text(json.dumps({
            "world": distributed.world_size(), "metrics": result.metrics, "steps": result.steps,
            "history": [h for h in result.history if "loss" in h]}))
    # every rank checks that it holds rank 0's weights
    flat = torch.cat([p.detach().reshape(-1) for p in student.parameters()])
    gathered = distributed.all_gather_objects(flat)
    assert all(torch.equal(g, gathered[0]) for g in gathered), "ranks diverged"
    if started:
        torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())
