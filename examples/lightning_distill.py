#!/usr/bin/env python3
"""Distillation with Lightning: kdfast's callback on an existing module, and its wrapper.

On scikit-learn's 8x8 digit images (1,797 images bundled with scikit-learn; 1,200 to
train on, 597 held out), a user's own ``LitClassifier`` (a network, the cross-entropy
and Adam) is trained with Lightning's ``Trainer``. The teacher learns from all 1,200
labels; the students see the 1,200 images but only 240 of their labels (``--labelled``;
the others are -100, which the cross-entropy skips), so what they learn on the other
960 images comes from the teacher:

  teacher   a 10k-parameter CNN, the LitClassifier as it is;
  baseline  a 690-parameter CNN student, the LitClassifier as it is (240 labels);
  callback  the same student and module, plus ``DistillationCallback(teacher)``: kdfast's
            soft-label term is added to the module's own loss, the module unchanged;
  wrapper   the same student as a plain ``nn.Module`` in ``DistillationModule`` with the
            ``"feature"`` mode (soft labels + a FitNets hint from the teacher's feature
            maps through a 1x1-conv regressor built on the first batch), AdamW with a
            cosine schedule, checkpoints in ``<out>/wrapper`` (``--resume`` continues
            from ``last.ckpt``).

Each line reports the held-out accuracy and the agreement with the teacher (the share of
images where the student's and the teacher's predicted digit are the same).

    python examples/lightning_distill.py                 # 400 steps per student
    python examples/lightning_distill.py --steps 40      # a smoke run of seconds
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # run from a checkout without installing

from kdfast.integrations.lightning import DistillationCallback, DistillationModule, pl  # noqa: E402
from kdfast.train import metrics  # noqa: E402


class TeacherNet(nn.Module):
    """Two 3x3 convolutions (16, 32 channels), a 2x2 pool, a linear head: 9,930 parameters."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
                                      nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(32 * 16, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class StudentNet(nn.Module):
    """One 3x3 convolution (4 channels), a 2x2 pool, a linear head: 690 parameters."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(4 * 16, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class LitClassifier(pl.LightningModule):
    """The user's module, written without distillation in mind."""

    def __init__(self, net: nn.Module, lr: float = 3e-3) -> None:
        super().__init__()
        self.net, self.lr = net, lr

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self.net(x), y)
        self.log("train_ce", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_acc", (self(x).argmax(-1) == y).float().mean(), prog_bar=True)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.lr)


def digits(labelled: int) -> tuple[DataLoader, DataLoader, DataLoader, torch.Tensor, torch.Tensor]:
    """Loaders of the 1,200 training images with every label (for the teacher) and with
    only the first ``labelled`` labels (the others -100, for the students), the held-out
    loader, and the held-out images and labels."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0       # [1797, 1, 8, 8]
    y = torch.tensor(d.target, dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    x, y = x[perm], y[perm]
    few = y[:1200].clone()
    few[labelled:] = -100                                 # F.cross_entropy's default ignore_index

    def loader(labels: torch.Tensor) -> DataLoader:
        return DataLoader(TensorDataset(x[:1200], labels), batch_size=64, shuffle=True,
                          generator=torch.Generator().manual_seed(1))

    test = DataLoader(TensorDataset(x[1200:], y[1200:]), batch_size=600)
    return loader(y[:1200]), loader(few), test, x[1200:], y[1200:]


def make_trainer(steps: int, **kw) -> pl.Trainer:
    kw.setdefault("logger", False)
    kw.setdefault("enable_checkpointing", False)
    return pl.Trainer(accelerator="cpu", devices=1, max_steps=steps, enable_progress_bar=False,
                      enable_model_summary=False, **kw)


def report(name: str, model: nn.Module, teacher: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    model.eval()
    with torch.no_grad():
        logits, t_logits = model(x), teacher(x)
    params = sum(p.numel() for p in model.parameters())
    line = f"{name}: test accuracy {metrics.accuracy(logits, y):.3f}"
    if model is not teacher:
        line += f", agreement with the teacher {metrics.agreement(logits, t_logits):.3f}"
    print(f"{line} ({params} parameters)", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=400, help="optimizer steps per model (default 400)")
    parser.add_argument("--out", type=Path, default=None, help="folder for the wrapper's checkpoints "
                        "(default: a temporary folder)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the wrapper from <out>/wrapper/last.ckpt")
    parser.add_argument("--labelled", type=int, default=240,
                        help="training images whose label the students see (default 240 of 1,200)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = parser.parse_args()
    if args.steps < 1:
        parser.error("--steps must be >= 1")
    if not 64 <= args.labelled <= 1200:
        parser.error("--labelled must be in [64, 1200]")
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    out = args.out or Path(tempfile.mkdtemp(prefix="kdfast-lightning-"))
    teacher_loader, train_loader, test_loader, x_test, y_test = digits(args.labelled)

    pl.seed_everything(0, verbose=False)
    teacher = TeacherNet()
    make_trainer(args.steps).fit(LitClassifier(teacher), teacher_loader, test_loader)
    teacher.eval()
    report("teacher", teacher, teacher, x_test, y_test)

    pl.seed_everything(0, verbose=False)
    baseline = StudentNet()
    make_trainer(args.steps).fit(LitClassifier(baseline), train_loader, test_loader)
    report("baseline", baseline, teacher, x_test, y_test)

    # 1. the user's module as it is, plus the callback (the teacher stays in the callback)
    pl.seed_everything(0, verbose=False)
    student = StudentNet()
    kd = DistillationCallback(teacher, temperature=4.0, alpha=0.5, module="net")
    trainer = make_trainer(args.steps, callbacks=[kd])
    trainer.fit(LitClassifier(student), train_loader, test_loader)
    report("callback", student, teacher, x_test, y_test)
    print(f"  logged: kd {trainer.callback_metrics['distill/kd']:.4f}, "
          f"task loss {trainer.callback_metrics['distill/task_loss']:.4f}", flush=True)

    # 2. the wrapper: any kdfast.train mode, here soft labels + a FitNets hint
    pl.seed_everything(0, verbose=False)
    student = StudentNet()
    module = DistillationModule(student, "feature", teacher=teacher, pairs={"features": "features"},
                                kind="hint", weight=1.0, temperature=4.0, alpha=0.5,
                                lr=1e-2, scheduler="cosine", warmup_steps=max(args.steps // 20, 1))
    folder = out / "wrapper"
    checkpoints = pl.callbacks.ModelCheckpoint(dirpath=folder, save_last=True, save_top_k=0,
                                               every_n_train_steps=max(args.steps // 10, 1))
    trainer = make_trainer(args.steps, callbacks=[checkpoints], enable_checkpointing=True)
    resume = "last" if args.resume and (folder / "last.ckpt").is_file() else None
    trainer.fit(module, train_loader, test_loader, ckpt_path=resume)
    report("wrapper", student, teacher, x_test, y_test)
    m = trainer.callback_metrics
    print(f"  logged: val/accuracy {m['val/accuracy']:.3f}, val/agreement {m['val/agreement']:.3f}, "
          f"val/ece {m['val/ece']:.3f}, train/feature {m['train/feature']:.4f}", flush=True)
    print(f"  checkpoint: {folder / 'last.ckpt'} (student and regressor; no teacher weights)", flush=True)


if __name__ == "__main__":
    main()
