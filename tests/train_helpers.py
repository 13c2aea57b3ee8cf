"""Shared pieces of the training-layer tests: tiny models and data."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

IN, CLASSES = 12, 5


class Net(nn.Module):
    """A small MLP with named parts: ``body`` (features) and ``head`` (logits)."""

    def __init__(self, hidden: int = 16, classes: int = CLASSES, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.body = nn.Sequential(nn.Linear(IN, hidden), nn.ReLU())
        self.head = nn.Linear(hidden, classes)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


class ConvNet(nn.Module):
    """A tiny CNN on ``[N, 1, 8, 8]`` with ``features`` (a ``[N, C, 4, 4]`` map) and ``head``."""

    def __init__(self, channels: int = 4, classes: int = CLASSES, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.features = nn.Sequential(nn.Conv2d(1, channels, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(channels * 16, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def data(n: int = 96, seed: int = 0, unlabelled_every: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, IN, generator=g)
    y = torch.randint(0, CLASSES, (n,), generator=g)
    if unlabelled_every:
        y[::unlabelled_every] = -100
    return x, y


def loader(n: int = 96, batch_size: int = 16, seed: int = 0, shuffle: bool = True,
           unlabelled_every: int = 0) -> DataLoader:
    x, y = data(n, seed, unlabelled_every)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=shuffle)


def backward_step(mode, student: nn.Module, batch):
    """One forward of ``mode`` on ``batch`` and its backward into fresh gradients."""
    student.zero_grad(set_to_none=True)
    out = mode(student, batch)
    out.loss.backward()
    return out


def params_of(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def unchanged(model: nn.Module, before: list[torch.Tensor]) -> bool:
    return all(torch.equal(p, q) for p, q in zip(model.parameters(), before))


class Crash(Exception):
    """Raised by :func:`crash_at` to kill a run."""


def crash_at(step: int) -> list:
    """Distiller callbacks that raise :class:`Crash` once the run reaches optimizer ``step``
    (the checkpoint of the step before is on disk with ``save_every=1``)."""
    def callback(event, distiller, logs):
        if event == "step" and distiller.step == step:
            raise Crash
    return [callback]


def crash_and_resume(tmp_path, run, step: int):
    """``(straight, resumed)``: ``run(folder, callbacks=(), resume=None) -> Distiller`` once
    straight, and once crashed at ``step`` then resumed from its folder (under a different
    global random state, which the checkpoint must restore)."""
    import pytest

    straight = run(tmp_path / "straight")
    with pytest.raises(Crash):
        run(tmp_path / "crashed", callbacks=crash_at(step))
    torch.manual_seed(999)
    return straight, run(tmp_path / "crashed", resume=True)


def assert_identical_runs(straight, resumed) -> None:
    """Same steps, bit-identical student and mode state, and the same logged losses."""
    assert resumed.step == straight.step
    for a, b in zip(params_of(straight.student) + list(straight.mode.state_dict().values()),
                    params_of(resumed.student) + list(resumed.mode.state_dict().values())):
        assert torch.equal(a, b)
    losses = [(h["step"], h["loss"]) for h in straight.history if "loss" in h]
    assert [(h["step"], h["loss"]) for h in resumed.history if "loss" in h] == losses
