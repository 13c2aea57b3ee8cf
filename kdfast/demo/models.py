"""Small digit students for the distillation demo: ``[N, 1, 28, 28]`` in ``[0, 1]`` -> ``[N, 10]``.

Each student has two named submodules, ``features`` (input -> feature tensor of
``feature_shape`` per image, the place for feature hints) and ``head`` (features ->
logits), and ``forward_with_features`` returning both, the same interface as
``kdfast.demo.data.DigitTeacher``.

Measured with Adam (lr 2e-3, batch 64, one CPU thread, torch 2.13), test accuracy on 1,000
held-out MNIST 5k images, mean of 3 seeds, in %; "KD" is ``kdfast.kd_loss`` at T=4 (alpha 0)
on the MNIST teacher's logits of 3,500 unlabelled images, "CE" is cross-entropy on 500
labelled ones. Splits of ``load_mnist5k(seed=0)``: test ``[:1000]``, labelled
``[1000:1500]``, unlabelled ``[1500:]``.

==================== ======= ===== ====== ======= ======= ==============
student              params  steps CE 500 KD 3500 CE 3500 CPU s per run
==================== ======= ===== ====== ======= ======= ==============
MLPStudent()         101,770   300   84.8    90.5    92.1 0.4
MLPStudent()         101,770   600   84.4    91.6    92.6 1.0
MLPStudent()         101,770 1,000   84.4    91.9    93.0 1.5
ConvStudent()          9,098   300   85.9    90.5    91.7 0.7
ConvStudent()          9,098   600   85.7    92.5    93.2 1.5
ConvStudent()          9,098 1,000   85.4    93.6    94.2 2.2
ConvStudent(16, 32)   20,490   300   86.3    91.8    93.5 1.1
ConvStudent(16, 32)   20,490   600   85.8    93.5    94.7 2.3
ConvStudent(16, 32)   20,490 1,000   85.9    94.4    95.1 3.2
==================== ======= ===== ====== ======= ======= ==============

(Seed spread: standard deviation 0.1 to 0.9 points. "CE 3500" uses the true labels of
the unlabelled set, the ceiling of the soft-label run. KD at T=4 on the same 500 labelled
images gives no gain over CE on them: 84.8 and 85.9 at 300 steps.)

Cross-entropy on 500 labels saturates by 300 steps; soft labels on the larger unlabelled
set keep improving and end 0.6 to 1.7 points below training on its true labels. A training
step costs about 1.4 ms (MLP) and 2.6 ms (ConvStudent) at batch 64 on one thread.

Domain shift (``ConvStudent()``, 600 steps, 2 seeds; sklearn digits shuffled with seed 0:
test ``[:597]``, labelled ``[597:797]``, unlabelled ``[797:]``), accuracy on the digits test
part in %: trained on MNIST labels only 73.0; soft labels (T=4) on the 1,000 unlabelled
digits from the MNIST teacher 86.9 (teacher itself 86.1), USPS teacher 79.5, SVHN teacher
83.2, the mean of the three teachers' logits 90.4; cross-entropy on 30 / 50 / 100 / 200
labelled digits (300 steps for 30-100) 77.6 / 81.2 / 91.0 / 93.9, on all 1,000 97.7.
"""

from __future__ import annotations

import torch
from torch import nn

_INPUT_SHAPE = (1, 28, 28)


class DigitStudent(nn.Module):
    """Base: ``forward(x) = head(features(x))``; subclasses set ``features``, ``head``
    and ``feature_shape`` (the per-image shape of ``features(x)``)."""

    features: nn.Module
    head: nn.Module
    feature_shape: tuple[int, ...]

    def forward_with_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(features [N, *feature_shape], logits [N, 10])`` of ``x`` ``[N, 1, 28, 28]``."""
        if x.dim() != 4 or tuple(x.shape[1:]) != _INPUT_SHAPE:
            raise ValueError(f"{type(self).__name__}: x must be [N, 1, 28, 28], got {list(x.shape)}")
        feats = self.features(x)
        return feats, self.head(feats)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_with_features(x)[1]


def _positive_int(owner: str, name: str, value: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{owner}: {name} must be a positive int, got {value!r}")
    return value


class MLPStudent(DigitStudent):
    """784 -> ``hidden`` (ReLU) -> 10. ``features``: flatten, linear, ReLU (``[N, hidden]``);
    ``head``: linear. 101,770 parameters at ``hidden=128``.

    Example:
        >>> MLPStudent()(torch.rand(2, 1, 28, 28)).shape
        torch.Size([2, 10])
    """

    def __init__(self, hidden: int = 128) -> None:
        super().__init__()
        hidden = _positive_int("MLPStudent", "hidden", hidden)
        self.features = nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, hidden), nn.ReLU())
        self.head = nn.Linear(hidden, 10)
        self.feature_shape = (hidden,)


class ConvStudent(DigitStudent):
    """Two stride-2 3x3 convolutions (1 -> ``c1`` -> ``c2`` channels, ReLU), 28 -> 14 -> 7, then a
    linear layer. ``features``: ``[N, c2, 7, 7]`` (the MNIST teacher's feature map is
    ``[N, 64, 7, 7]``: a 1x1 convolution ``c2 -> 64`` matches them for a hint);
    ``head``: flatten, linear. 9,098 parameters at ``(8, 16)``, 20,490 at ``(16, 32)``.

    Example:
        >>> student = ConvStudent()
        >>> feats, logits = student.forward_with_features(torch.rand(2, 1, 28, 28))
        >>> feats.shape, logits.shape
        (torch.Size([2, 16, 7, 7]), torch.Size([2, 10]))
    """

    def __init__(self, c1: int = 8, c2: int = 16) -> None:
        super().__init__()
        c1 = _positive_int("ConvStudent", "c1", c1)
        c2 = _positive_int("ConvStudent", "c2", c2)
        self.features = nn.Sequential(
            nn.Conv2d(1, c1, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(c1, c2, 3, stride=2, padding=1), nn.ReLU())
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(c2 * 7 * 7, 10))
        self.feature_shape = (c2, 7, 7)
