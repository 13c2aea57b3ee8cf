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


def params_of(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def unchanged(model: nn.Module, before: list[torch.Tensor]) -> bool:
    return all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
