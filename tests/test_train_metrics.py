"""kdfast.train.metrics against scikit-learn and independent numpy references."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from kdfast.train import metrics
from kdfast.train.metrics import (
    MetricTracker,
    accuracy,
    agreement,
    evaluate,
    expected_calibration_error,
    format_table,
    precision_recall_f1,
    topk_accuracy,
)

IGNORE = -100
SEEDS = (0, 1, 2, 3)


def make_case(seed: int, lead: tuple[int, ...] = (240,), num_classes: int = 10,
              dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    """Random logits and labels where classes 7..9 are never predicted, 6..9 never labelled
    (so 7..9 appear nowhere) and about 10% of the rows carry IGNORE."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(*lead, num_classes, generator=g, dtype=torch.float64)
    logits[..., 7:] -= 20.0
    labels = torch.randint(0, 6, lead, generator=g)
    labels[torch.rand(lead, generator=g) < 0.1] = IGNORE
    return logits.to(dtype), labels


def flat_numpy(logits: torch.Tensor, labels: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Counted rows as float64 numpy arrays (scores [n, C], labels [n])."""
    x = logits.double().reshape(-1, logits.shape[-1]).numpy()
    y = labels.reshape(-1).numpy()
    keep = y != IGNORE
    return x[keep], y[keep]


def numpy_ece(scores: np.ndarray, y: np.ndarray, n_bins: int) -> float:
    """ECE with a loop over bins (lo, hi], lo = m / n_bins (Guo et al. 2017)."""
    shifted = np.exp(scores - scores.max(axis=1, keepdims=True))
    probs = shifted / shifted.sum(axis=1, keepdims=True)
    confidence, correct = probs.max(axis=1), probs.argmax(axis=1) == y
    edges = np.arange(n_bins + 1) / n_bins
    total = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        in_bin = (confidence > lo) & (confidence <= hi)
        if in_bin.any():
            total += in_bin.mean() * abs(correct[in_bin].mean() - confidence[in_bin].mean())
    return total


def numpy_nll(scores: np.ndarray, y: np.ndarray) -> float:
    top = scores.max(axis=1, keepdims=True)
    log_probs = scores - top - np.log(np.exp(scores - top).sum(axis=1, keepdims=True))
    return float(-log_probs[np.arange(len(y)), y].mean())


# ----------------------------------------------------------------------------- against sklearn


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("lead", [(240,), (4, 60)], ids=["NC", "BTC"])
def test_metrics_match_sklearn(seed, lead):
    skm = pytest.importorskip("sklearn.metrics")
    logits, labels = make_case(seed, lead)
    x, y = flat_numpy(logits, labels)
    pred = x.argmax(axis=1)
    assert accuracy(logits, labels) == pytest.approx(skm.accuracy_score(y, pred), abs=1e-15)
    for k in (1, 3, 5):
        expected = skm.top_k_accuracy_score(y, x, k=k, labels=range(10))
        assert topk_accuracy(logits, labels, k=k) == pytest.approx(expected, abs=1e-15)
    # default: classes present in labels or predictions; num_classes: every class
    present = skm.precision_recall_fscore_support(y, pred, average="macro", zero_division=0)[:3]
    every = skm.precision_recall_fscore_support(y, pred, average="macro", zero_division=0,
                                                labels=range(10))[:3]
    assert precision_recall_f1(logits, labels) == pytest.approx(present, abs=1e-12)
    assert precision_recall_f1(logits, labels, num_classes=10) == pytest.approx(every, abs=1e-12)
    assert every[0] < present[0]  # the never-seen classes 7..9 do count with num_classes

    tracker = MetricTracker(10, topk=(1, 3))
    tracker.update(logits, labels)
    m = tracker.compute()
    assert m["accuracy"] == m["top1_accuracy"] == accuracy(logits, labels)
    assert m["top3_accuracy"] == pytest.approx(skm.top_k_accuracy_score(y, x, k=3, labels=range(10)))
    assert (m["precision"], m["recall"], m["f1"]) == pytest.approx(every, abs=1e-12)
    assert m["nll"] == pytest.approx(skm.log_loss(y, torch.softmax(torch.from_numpy(x), 1).numpy(),
                                                  labels=range(10)), rel=1e-9)


@pytest.mark.parametrize("seed", SEEDS)
def test_integer_predictions_match_sklearn(seed):
    skm = pytest.importorskip("sklearn.metrics")
    g = torch.Generator().manual_seed(seed)
    pred = torch.randint(0, 5, (3, 70), generator=g)
    labels = torch.randint(1, 7, (3, 70), generator=g)  # 0 only predicted, 5 and 6 only labelled
    labels[:, ::9] = IGNORE
    keep = (labels != IGNORE).numpy()
    y, p = labels.numpy()[keep], pred.numpy()[keep]
    assert accuracy(pred, labels) == pytest.approx(skm.accuracy_score(y, p), abs=1e-15)
    present = skm.precision_recall_fscore_support(y, p, average="macro", zero_division=0)[:3]
    every = skm.precision_recall_fscore_support(y, p, average="macro", zero_division=0, labels=range(9))[:3]
    assert precision_recall_f1(pred, labels) == pytest.approx(present, abs=1e-12)
    assert precision_recall_f1(pred, labels, num_classes=9) == pytest.approx(every, abs=1e-12)
    assert precision_recall_f1(pred.int(), labels.to(torch.int16)) == pytest.approx(present, abs=1e-12)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("seed", SEEDS[:2])
def test_every_float_dtype(dtype, seed):
    """Row-wise distinct multiples of 1/4 below 16: exact in every dtype, no ties."""
    skm = pytest.importorskip("sklearn.metrics")
    g = torch.Generator().manual_seed(seed)
    base = torch.stack([torch.randperm(64, generator=g)[:12] for _ in range(150)]).double() / 4
    labels = torch.randint(0, 12, (150,), generator=g)
    labels[::7] = IGNORE
    logits = base.to(dtype).reshape(5, 30, 12)
    labels = labels.reshape(5, 30)
    assert torch.equal(logits.double().reshape(150, 12), base)
    x, y = flat_numpy(logits, labels)
    pred = x.argmax(axis=1)
    assert accuracy(logits, labels) == pytest.approx(skm.accuracy_score(y, pred), abs=1e-15)
    assert topk_accuracy(logits, labels, k=4) == pytest.approx(
        skm.top_k_accuracy_score(y, x, k=4, labels=range(12)), abs=1e-15)
    assert precision_recall_f1(logits, labels, num_classes=12) == pytest.approx(
        skm.precision_recall_fscore_support(y, pred, average="macro", zero_division=0,
                                            labels=range(12))[:3], abs=1e-12)
    tol = 1e-12 if dtype == torch.float64 else 1e-6
    assert expected_calibration_error(logits, labels) == pytest.approx(numpy_ece(x, y, 15), abs=tol)
    tracker = MetricTracker(12)
    tracker.update(logits, labels)
    assert tracker.compute()["nll"] == pytest.approx(numpy_nll(x, y), rel=tol)


# ----------------------------------------------------------------------------- ECE


@pytest.mark.parametrize("n_bins", [1, 5, 15, 37])
@pytest.mark.parametrize("seed", SEEDS)
def test_ece_matches_numpy_loop(seed, n_bins):
    logits, labels = make_case(seed, (3, 80))
    logits = logits * 0.5  # spread the confidences over many bins
    x, y = flat_numpy(logits, labels)
    expected = numpy_ece(x, y, n_bins)
    assert expected > 0.01
    assert expected_calibration_error(logits, labels, n_bins=n_bins) == pytest.approx(expected, abs=1e-12)


def test_ece_hand_checked_cases():
    four_way = torch.zeros(8, 4)  # confidence exactly 1/4, prediction 0
    calibrated = torch.tensor([0, 1, 2, 3, 0, 3, 2, 1])
    assert expected_calibration_error(four_way, calibrated) == 0.0
    assert expected_calibration_error(four_way, torch.zeros(8, dtype=torch.long)) == 0.75
    assert expected_calibration_error(four_way, torch.ones(8, dtype=torch.long)) == 0.25
    # confidence 3/4, three rows of four right: calibrated; all right: off by 1/4
    three_to_one = torch.tensor([[math.log(3.0), 0.0]], dtype=torch.float64).repeat(4, 1)
    assert expected_calibration_error(three_to_one, torch.tensor([0, 0, 0, 1])) == pytest.approx(0, abs=1e-15)
    assert expected_calibration_error(three_to_one, torch.zeros(4, dtype=torch.long)) == pytest.approx(0.25)
    # bins are right-inclusive: confidence 0.5 falls in (0, 0.5], apart from 0.75 in (0.5, 1];
    # one bin for both would give |1 - 1.25| / 2 = 0.125 instead of (0.5 + 0.75) / 2
    edge = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]], dtype=torch.float64)
    assert expected_calibration_error(edge, torch.tensor([0, 1]), n_bins=2) == pytest.approx(0.625)
    assert expected_calibration_error(edge, torch.tensor([0, 1]), n_bins=1) == pytest.approx(0.125)
    certain = torch.tensor([[0.0, -1e4]])  # confidence exactly 1: the last bin (.., 1]
    assert expected_calibration_error(certain, torch.tensor([1]), n_bins=3) == 1.0


# ----------------------------------------------------------------------------- ties, agreement, empties


def test_ties_go_to_the_lowest_index():
    logits = torch.zeros(4, 4, dtype=torch.bfloat16)
    labels = torch.arange(4)
    assert accuracy(logits, labels) == 0.25
    for k in range(1, 5):
        assert topk_accuracy(logits, labels, k=k) == k / 4
    tracker = MetricTracker(4, topk=(1, 2))
    tracker.update(logits, labels)
    assert tracker.compute()["top1_accuracy"] == tracker.compute()["accuracy"] == 0.25
    assert tracker.compute()["top2_accuracy"] == 0.5


@pytest.mark.parametrize("seed", SEEDS[:2])
def test_agreement_matches_numpy(seed):
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(6, 40, 5, generator=g).to(torch.bfloat16)
    teacher = student.float() + 0.7 * torch.randn(6, 40, 5, generator=g)
    mask = torch.rand(6, 40, generator=g) < 0.8
    same = student.float().numpy().argmax(-1) == teacher.numpy().argmax(-1)
    assert 0.3 < same.mean() < 0.95
    assert agreement(student, teacher) == pytest.approx(same.mean(), abs=1e-15)
    assert agreement(student, teacher, mask=mask) == pytest.approx(same[mask.numpy()].mean(), abs=1e-15)
    assert agreement(student, student) == 1.0


def test_nothing_counted_gives_nan():
    empty, no_labels = torch.zeros(0, 3), torch.zeros(0, dtype=torch.long)
    ignored = torch.full((4,), IGNORE)
    for logits, labels in ((empty, no_labels), (torch.randn(4, 3), ignored)):
        assert math.isnan(accuracy(logits, labels))
        assert math.isnan(topk_accuracy(logits, labels, k=2))
        assert all(math.isnan(v) for v in precision_recall_f1(logits, labels))
        assert all(math.isnan(v) for v in precision_recall_f1(logits, labels, num_classes=3))
        assert math.isnan(expected_calibration_error(logits, labels))
    assert math.isnan(accuracy(no_labels, no_labels))
    assert math.isnan(agreement(empty, empty))
    assert math.isnan(agreement(torch.randn(4, 3), torch.randn(4, 3), mask=torch.zeros(4, dtype=torch.bool)))
    tracker = MetricTracker(3, topk=(2,))
    assert tracker.compute() == {}
    tracker.update(torch.randn(4, 3), ignored, teacher_logits=torch.randn(4, 3))
    m = tracker.compute()
    assert sorted(m) == ["accuracy", "agreement", "ece", "f1", "nll", "precision", "recall", "top2_accuracy"]
    assert all(math.isnan(v) for v in m.values())


# ----------------------------------------------------------------------------- the tracker


@pytest.mark.parametrize("seed", SEEDS[:2])
def test_tracker_over_batches_equals_one_shot(seed, monkeypatch):
    logits, labels = make_case(seed, (300,), dtype=torch.float32)
    g = torch.Generator().manual_seed(seed + 100)
    teacher = logits + torch.randn(logits.shape, generator=g)
    labels[100:130] = IGNORE  # a batch with no counted row
    counted = labels != IGNORE

    one_shot = MetricTracker(10, topk=(1, 2, 5), n_bins=10)
    one_shot.update(logits, labels, teacher)
    expected = one_shot.compute()
    assert expected == pytest.approx({
        "accuracy": accuracy(logits, labels),
        "top1_accuracy": accuracy(logits, labels),
        "top2_accuracy": topk_accuracy(logits, labels, k=2),
        "top5_accuracy": topk_accuracy(logits, labels, k=5),
        **dict(zip(("precision", "recall", "f1"), precision_recall_f1(logits, labels, num_classes=10))),
        "ece": expected_calibration_error(logits, labels, n_bins=10),
        "nll": numpy_nll(*flat_numpy(logits, labels)),
        "agreement": agreement(logits, teacher, mask=counted),
    }, rel=1e-6)

    monkeypatch.setattr(metrics, "_CHUNK_ELEMENTS", 13 * 10)  # 13 rows a chunk
    tracker = MetricTracker(10, topk=(1, 2, 5), n_bins=10)
    for start, stop in ((0, 1), (1, 100), (100, 130), (130, 131), (131, 300)):
        tracker.update(logits[start:stop], labels[start:stop], teacher[start:stop])
    assert tracker.compute() == pytest.approx(expected, rel=1e-12)
    # labels only in some batches, the teacher only in others
    tracker.reset()
    tracker.update(logits[:150], labels[:150])
    tracker.update(logits[150:], labels[150:], teacher[150:])
    tracker.update(logits[:150], teacher_logits=teacher[:150])
    m = tracker.compute()
    assert m["f1"] == pytest.approx(expected["f1"], rel=1e-12)
    rows = int(counted[150:].sum())
    assert m["agreement"] == pytest.approx(
        (agreement(logits[150:], teacher[150:], mask=counted[150:]) * rows
         + agreement(logits[:150], teacher[:150]) * 150) / (rows + 150), rel=1e-12)
    tracker.reset()
    assert tracker.compute() == {}


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU available")
def test_tracker_on_cuda_matches_cpu_in_deterministic_mode():
    logits, labels = make_case(0, (4, 75), dtype=torch.bfloat16)
    teacher = torch.roll(logits, 1, dims=-1)
    cpu, cuda = MetricTracker(10, topk=(1, 5)), MetricTracker(10, topk=(1, 5))
    cpu.update(logits, labels, teacher)
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        cuda.update(logits.cuda(), labels.cuda(), teacher.cuda())
        cuda.update(logits[:1].cuda(), labels[:1].cuda())
        cpu.update(logits[:1], labels[:1])
        result = cuda.compute()
        assert accuracy(logits.cuda(), labels.cuda()) == accuracy(logits, labels)
        assert expected_calibration_error(logits.cuda(), labels.cuda()) == pytest.approx(
            expected_calibration_error(logits, labels), abs=1e-6)
    finally:
        torch.use_deterministic_algorithms(was_deterministic)
    assert result == pytest.approx(cpu.compute(), rel=1e-6)


def test_tracker_topk_forms():
    assert MetricTracker(10, topk=3).topk == (3,)
    assert MetricTracker(10, topk=(5, 1, 5)).topk == (5, 1)
    tracker = MetricTracker(4, topk=())
    tracker.update(torch.randn(3, 4), torch.tensor([0, 1, 2]))
    assert not any(key.startswith("top") for key in tracker.compute())


# ----------------------------------------------------------------------------- evaluate


class TinyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.Dropout(0.5), nn.Linear(16, 4))
        self.inference_mode_seen: list[bool] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.inference_mode_seen.append(torch.is_inference_mode_enabled())
        return self.body(x)


def test_evaluate_matches_the_tracker_and_restores_modes():
    torch.manual_seed(0)
    model, teacher = TinyNet(), TinyNet()
    model.train()
    model.body[1].eval()  # a frozen norm inside a training model: must stay as it was
    teacher.eval()
    batches = [(torch.randn(9, 6), torch.randint(0, 4, (9,)), "extra") for _ in range(3)]
    result = evaluate(model, batches, num_classes=4, teacher=teacher, topk=(2,))

    assert model.training and not model.body[1].training and model.body[2].training
    assert not teacher.training
    assert model.inference_mode_seen == [True] * 3
    model.eval()
    with torch.no_grad():
        reference = MetricTracker(4, topk=(2,))
        for x, y, _ in batches:
            reference.update(model(x), y, teacher(x))
    assert result == reference.compute()


def test_evaluate_dict_batches_and_custom_forward():
    torch.manual_seed(1)

    class KeywordNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Linear(6, 3)

        def forward(self, features: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
            return self.proj(features) * scale

    model = KeywordNet()
    data = [{"inputs": {"features": torch.randn(2, 5, 6)}, "labels": torch.randint(0, 3, (2, 5))}
            for _ in range(2)]
    result = evaluate(model, data, num_classes=3, topk=(1,))
    reference = MetricTracker(3, topk=(1,))
    with torch.no_grad():
        for batch in data:
            reference.update(model(**batch["inputs"]), batch["labels"])
    assert result == reference.compute()

    def as_output(net: nn.Module, inputs: dict) -> SimpleNamespace:
        return SimpleNamespace(logits=net(inputs["features"], scale=2.0))

    custom = evaluate(model, data, num_classes=3, topk=(1,), forward=as_output)
    assert custom["accuracy"] == result["accuracy"]


def test_evaluate_restores_modes_on_error():
    model = TinyNet().train()

    def broken(net: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        evaluate(model, [(torch.randn(2, 6), torch.zeros(2, dtype=torch.long))], num_classes=4,
                 topk=(2,), forward=broken)
    assert all(module.training for module in model.modules())


# ----------------------------------------------------------------------------- format_table


def test_format_table_markdown_and_plain():
    rows = {"student": {"accuracy": 0.75, "nll": 0.6123456, "note": "kd|T=4"},
            "teacher": {"nll": 0.5, "accuracy": 0.8125}}
    assert format_table(rows) == "\n".join([
        "|         | accuracy |    nll |    note |",
        "|:--------|---------:|-------:|--------:|",
        "| student |   0.7500 | 0.6123 | kd\\|T=4 |",
        "| teacher |   0.8125 | 0.5000 |       - |",
    ])
    assert format_table(rows, ["nll", "f1"], fmt="{:.2f}", markdown=False) == "\n".join([
        "          nll  f1",
        "-------  ----  --",
        "student  0.61   -",
        "teacher  0.50   -",
    ])
    assert format_table({}) == "|   |\n|:--|"


# ----------------------------------------------------------------------------- errors


LOGITS, LABELS = torch.randn(5, 3), torch.tensor([0, 1, 2, 1, IGNORE])


def run_evaluate(loader: list, model: object = None, **kwargs) -> dict[str, float]:
    return evaluate(nn.Linear(2, 3) if model is None else model, loader, num_classes=3, topk=(), **kwargs)


@pytest.mark.parametrize("call, error, match", [
    (lambda: accuracy(LOGITS, LABELS[:4]), ValueError,
     r"accuracy: labels must have shape \[5\] \(the leading shape of logits\), got \[4\]"),
    (lambda: accuracy(torch.tensor([0, 1]), torch.tensor([0])), ValueError,
     r"accuracy: labels must have shape \[2\] \(the shape of logits\)"),
    (lambda: accuracy(LOGITS, torch.tensor([0, 1, 3, 1, 1])), ValueError,
     r"accuracy: labels must be in \[0, 3\) or equal ignore_index=-100, got 3"),
    (lambda: topk_accuracy(LOGITS, torch.tensor([0, -1, 2, 1, 1])), ValueError,
     r"topk_accuracy: labels must be in \[0, 3\) or equal ignore_index=-100, got -1"),
    (lambda: accuracy(LOGITS, LABELS.float()), TypeError, "accuracy: labels must be an integer tensor"),
    (lambda: accuracy(LOGITS, [0, 1, 2, 1, 0]), TypeError, "accuracy: labels must be a torch.Tensor"),
    (lambda: accuracy(LOGITS.bool(), LABELS), TypeError,
     "accuracy: logits must be float logits .* or integer predictions"),
    (lambda: accuracy(torch.tensor([0, -2]), torch.tensor([0, 1])), ValueError,
     r"accuracy: logits \(integer predictions\) must be >= 0, got -2"),
    (lambda: accuracy(LOGITS, LABELS, ignore_index=None), TypeError, "accuracy: ignore_index must be an int"),
    (lambda: accuracy(torch.tensor(1.0), torch.tensor(0)), ValueError, "accuracy: logits must have shape"),
    (lambda: accuracy(torch.zeros(5, 0), LABELS), ValueError,
     "accuracy: logits must have at least one class"),
    (lambda: topk_accuracy(LOGITS, LABELS, k=0), ValueError, r"topk_accuracy: k must be in \[1, 3\], got 0"),
    (lambda: topk_accuracy(LOGITS, LABELS, k=4), ValueError, r"topk_accuracy: k must be in \[1, 3\], got 4"),
    (lambda: topk_accuracy(LOGITS, LABELS, k=2.0), TypeError, "topk_accuracy: k must be an int"),
    (lambda: topk_accuracy(LOGITS.long(), LABELS), TypeError,
     "topk_accuracy: logits must be float16, bfloat16, float32 or float64 logits, got torch.int64"),
    (lambda: expected_calibration_error(LOGITS, LABELS, n_bins=0), ValueError,
     "expected_calibration_error: n_bins must be >= 1, got 0"),
    (lambda: precision_recall_f1(LOGITS, LABELS, num_classes=4), ValueError,
     r"precision_recall_f1: num_classes must equal the last dim of logits \(3\), got 4"),
    (lambda: precision_recall_f1(torch.tensor([0, 4]), torch.tensor([0, 1]), num_classes=4), ValueError,
     r"precision_recall_f1: logits \(integer predictions\) must be in \[0, 4\), got 4"),
    (lambda: agreement(LOGITS, LOGITS[:4]), ValueError,
     r"agreement: teacher_logits must have shape \[5, 3\] \(the shape of student_logits\), got \[4, 3\]"),
    (lambda: agreement(LOGITS, LOGITS, mask=torch.ones(5)), TypeError,
     "agreement: mask must be a bool tensor or None, got torch.float32"),
    (lambda: agreement(LOGITS, LOGITS, mask=torch.ones(4, dtype=torch.bool)), ValueError,
     r"agreement: mask must have shape \[5\]"),
    (lambda: MetricTracker(0), ValueError, "MetricTracker: num_classes must be >= 1, got 0"),
    (lambda: MetricTracker(3, topk=(1, 4)), ValueError,
     r"MetricTracker: topk must be in \[1, num_classes=3\] \(topk=\(\) for none\), got \(1, 4\)"),
    (lambda: MetricTracker(3, topk=(0,)), ValueError, "MetricTracker: topk must be >= 1, got 0"),
    (lambda: MetricTracker(3, topk="5"), TypeError, "MetricTracker: topk must be an int or a sequence"),
    (lambda: MetricTracker(3, topk=(1,), n_bins=0), ValueError, "MetricTracker: n_bins must be >= 1"),
    (lambda: MetricTracker(3, topk=(1,), ignore_index=1.5), TypeError,
     "MetricTracker: ignore_index must be an int"),
    (lambda: MetricTracker(4, topk=(1,)).update(LOGITS, LABELS), ValueError,
     r"MetricTracker.update: logits must have num_classes=4 classes in the last dim, got shape \[5, 3\]"),
    (lambda: MetricTracker(3, topk=(1,)).update(LOGITS), ValueError,
     "MetricTracker.update: needs labels, teacher_logits or both, got neither"),
    (lambda: MetricTracker(3, topk=(1,)).update(LOGITS, LABELS, LOGITS.T), ValueError,
     r"MetricTracker.update: teacher_logits must have shape \[5, 3\]"),
    (lambda: MetricTracker(3, topk=(1,)).update(LOGITS, LABELS, LOGITS.long()), TypeError,
     "MetricTracker.update: teacher_logits must be float16"),
    (lambda: run_evaluate([], "model"), TypeError, "evaluate: model must be a torch.nn.Module"),
    (lambda: run_evaluate([]), ValueError, "evaluate: loader yielded no batches"),
    (lambda: run_evaluate([torch.randn(2)]), TypeError,
     "evaluate: each batch must be an"),
    (lambda: run_evaluate([(torch.randn(1, 2),)]), ValueError,
     r"evaluate: a tuple batch must be \(inputs, labels, ...\), got 1 element"),
    (lambda: run_evaluate([{"inputs": torch.randn(1, 2)}]), ValueError,
     r"evaluate: a dict batch must have the keys 'inputs' and 'labels', missing \['labels'\]"),
    (lambda: run_evaluate([(torch.randn(1, 2), torch.zeros(1, dtype=torch.long))],
                          forward=lambda m, x: (m(x),)), TypeError,
     r"evaluate: forward\(model, inputs\) must return a logits tensor"),
    (lambda: format_table([1]), TypeError, "format_table: rows must be a mapping"),
    (lambda: format_table({"a": {"x": [1]}}), TypeError,
     r"format_table: rows\['a'\]\['x'\] must be a float or a str, got list"),
    (lambda: format_table({"a": {"x": 1.0}}, "x"), TypeError, "format_table: columns must be a sequence"),
])
def test_errors_name_the_argument(call, error, match):
    with pytest.raises(error, match=match):
        call()
