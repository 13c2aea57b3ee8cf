"""The consistency mode of kdfast.train (mean teacher, Pi-model): the loss against the
paper's formula written here in plain PyTorch, the EMA update against its formula, gradients
reaching the student only, the two backends agreeing, clear errors, and a Distiller run
with an identical continuation after a resume."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from kdfast.train import Consistency, Distiller, make_mode
from tests.train_helpers import Net, assert_identical_runs, crash_and_resume, data, loader

STD = 0.3


def _views(x: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The two Gaussian views the mode draws after ``torch.manual_seed(seed)``."""
    torch.manual_seed(seed)
    v1 = x + STD * torch.randn_like(x)
    v2 = x + STD * torch.randn_like(x)
    return v1, v2


def _ce(s: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
    if y is None or not (y != -100).any():
        return torch.zeros((), dtype=torch.float64)
    keep = y != -100
    return F.cross_entropy(s[keep].double(), y[keep])


def _mse_probs(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The paper's squared difference of the softmaxes, averaged over rows and classes."""
    return ((F.softmax(s.double(), -1) - F.softmax(t.double(), -1)) ** 2).mean()


def _kl_t2(s: torch.Tensor, t: torch.Tensor, temperature: float) -> torch.Tensor:
    log_q = F.log_softmax(s.double() / temperature, -1)
    log_p = F.log_softmax(t.double() / temperature, -1)
    return temperature**2 * (log_p.exp() * (log_p - log_q)).sum(-1).mean()


def _prepared(student, batch, **kw) -> Consistency:
    kw.setdefault("noise_std", STD)
    mode = Consistency(**kw)
    mode.prepare(student, batch)
    return mode


def _shift_ema(mode: Consistency, scale: float = 0.05) -> None:
    """Make the EMA teacher differ from the student (as it does after some steps)."""
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in mode.ema.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))


# -- the loss against the formula ----------------------------------------------------------


@pytest.mark.parametrize("distance", ["mse", "kl"])
@pytest.mark.parametrize("unlabelled", [0, 3])
def test_loss_matches_the_mean_teacher_formula(distance, unlabelled):
    student = Net(seed=2)
    x, y = data(40, unlabelled_every=unlabelled)
    mode = _prepared(student, (x, y), weight=7.0, rampup_steps=10, distance=distance, temperature=2.0)
    _shift_ema(mode)
    mode.steps.fill_(3)
    torch.manual_seed(11)
    out = mode(student, (x, y))
    v1, v2 = _views(x, 11)
    s, t = student(v1), mode.ema(v2)
    w = 7.0 * math.exp(-5 * (1 - 3 / 10) ** 2)
    cons = _mse_probs(s, t) if distance == "mse" else _kl_t2(s, t, 2.0)
    torch.testing.assert_close(out.loss.double(), _ce(s, y) + w * cons, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.parts["consistency"].double(), cons, rtol=1e-5, atol=1e-7)
    assert out.parts["weight"].item() == pytest.approx(w)
    torch.testing.assert_close(out.logits, s)
    assert out.labels is y


def test_batch_without_labels_is_the_consistency_alone():
    student = Net(seed=2)
    x, _ = data(24)
    mode = _prepared(student, (x,), weight=3.0)
    _shift_ema(mode)
    torch.manual_seed(4)
    out = mode(student, (x,))
    v1, v2 = _views(x, 4)
    torch.testing.assert_close(out.loss.double(), 3.0 * _mse_probs(student(v1), mode.ema(v2)),
                               rtol=1e-5, atol=1e-7)
    assert out.parts["ce"].item() == 0.0 and out.labels is None
    out.loss.backward()
    assert all(p.grad is not None for p in student.parameters())


def test_pi_model_uses_the_student_on_the_second_view_without_a_graph():
    student = Net(seed=2)
    x, y = data(32, unlabelled_every=2)
    mode = _prepared(student, (x, y), ema_decay=0.0, weight=5.0)
    assert mode.ema is None and mode.eval_teacher() is None
    torch.manual_seed(8)
    out = mode(student, (x, y))
    out.loss.backward()
    got = [p.grad.clone() for p in student.parameters()]
    # by hand: the target is the student on view 2, a constant
    student.zero_grad(set_to_none=True)
    v1, v2 = _views(x, 8)
    s, t = student(v1), student(v2).detach()
    expected = _ce(s, y) + 5.0 * _mse_probs(s, t)
    torch.testing.assert_close(out.loss.double(), expected, rtol=1e-5, atol=1e-6)
    expected.backward()
    for a, b in zip(got, student.parameters()):
        torch.testing.assert_close(a, b.grad.float(), rtol=1e-4, atol=1e-6)


def test_a_user_perturbation_replaces_the_noise():
    calls = []

    def flip_sign_of_half(inputs):
        calls.append(inputs)
        return inputs * torch.where(torch.rand(inputs.shape[0], 1) < 0.5, -1.0, 1.0)

    student = Net(seed=2)
    x, y = data(16)
    mode = _prepared(student, (x, y), perturb=flip_sign_of_half)
    torch.manual_seed(3)
    out = mode(student, (x, y))
    assert len(calls) == 2 and all(c is x for c in calls)
    torch.manual_seed(3)
    v1, v2 = flip_sign_of_half(x), flip_sign_of_half(x)
    s = student(v1)
    expected = _ce(s, y) + _mse_probs(s, mode.ema(v2))
    torch.testing.assert_close(out.loss.double(), expected, rtol=1e-5, atol=1e-6)


def test_rampup_follows_the_sigmoid_schedule():
    mode = Consistency(weight=2.0, rampup_steps=8)
    expected = [2.0 * math.exp(-5 * (1 - min(t / 8, 1)) ** 2) for t in (0, 2, 4, 8, 20)]
    assert [mode.consistency_weight(t) for t in (0, 2, 4, 8, 20)] == pytest.approx(expected)
    assert mode.consistency_weight(0) == pytest.approx(2.0 * math.exp(-5))
    assert Consistency(weight=2.0).consistency_weight(0) == 2.0


# -- gradients, the EMA update, backends -----------------------------------------------------


def test_ema_follows_the_formula_and_is_never_trained():
    torch.manual_seed(0)
    student = Net(seed=2).double()
    x, y = data(32, unlabelled_every=4)
    x = x.double()
    mode = _prepared(student, (x, y), ema_decay=0.8, weight=4.0)
    assert all(not p.requires_grad for p in mode.ema.parameters())
    assert list(mode.trainable_parameters()) == []
    reference = [p.detach().clone() for p in student.parameters()]
    opt = torch.optim.SGD(student.parameters(), lr=0.2)
    decays = []
    for step in range(1, 7):
        opt.zero_grad(set_to_none=True)
        mode(student, (x, y)).loss.backward()
        assert all(p.grad is None for p in mode.ema.parameters())
        opt.step()
        mode.end_step(student)
        d = min(1 - 1 / (step + 1), 0.8)          # 1/2, 2/3, 3/4, 4/5, then capped at 0.8
        decays.append(d)
        reference = [d * r + (1 - d) * p.detach() for r, p in zip(reference, student.parameters())]
        for e, r in zip(mode.ema.parameters(), reference):
            torch.testing.assert_close(e, r, rtol=1e-12, atol=1e-12)
    assert decays == pytest.approx([1 / 2, 2 / 3, 3 / 4, 4 / 5, 0.8, 0.8])
    assert int(mode.steps) == 6
    assert {"steps"} | {f"ema.{k}" for k in student.state_dict()} == set(mode.state_dict())


@pytest.mark.parametrize("distance", ["mse", "kl"])
def test_backends_agree(distance):
    x, y = data(32, unlabelled_every=3)
    results = []
    for backend in ("kdfast", "reference"):
        student = Net(seed=2)
        mode = _prepared(student, (x, y), backend=backend, distance=distance, temperature=3.0, weight=10.0)
        _shift_ema(mode)
        torch.manual_seed(1)
        out = mode(student, (x, y))
        out.loss.backward()
        results.append((out.loss.detach(), [p.grad for p in student.parameters()]))
    (la, ga), (lb, gb) = results
    torch.testing.assert_close(la, lb, rtol=1e-5, atol=1e-6)
    for a, b in zip(ga, gb):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# -- errors --------------------------------------------------------------------------------


@pytest.mark.parametrize("kw, err, match", [
    ({"weight": -1.0}, ValueError, "weight must be"),
    ({"ema_decay": 1.0}, ValueError, "ema_decay must be"),
    ({"rampup_steps": -2}, ValueError, "rampup_steps must be"),
    ({"rampup_steps": 1.5}, ValueError, "rampup_steps must be"),
    ({"distance": "l2"}, ValueError, "distance must be one of"),
    ({"temperature": 0.0}, ValueError, "temperature must be"),
    ({"noise_std": -0.1}, ValueError, "noise_std must be"),
    ({"perturb": 3}, TypeError, "perturb must be callable"),
    ({"backend": "fast"}, ValueError, "backend must be one of"),
])
def test_bad_options_raise(kw, err, match):
    with pytest.raises(err, match=f"Consistency: {match}"):
        Consistency(**kw)


def test_misuse_raises_clear_errors():
    student = Net()
    x, y = data(8)
    with pytest.raises(RuntimeError, match=r"call mode\.prepare"):
        Consistency()(student, (x, y))
    with pytest.raises(TypeError, match=r"floating-point tensor inputs, got torch\.int64 tensor"):
        Consistency().prepare(student, (torch.zeros(8, 12, dtype=torch.long), y))
    with pytest.raises(TypeError, match="floating-point tensor inputs, got dict"):
        Consistency().prepare(student, {"inputs": {"x": x}, "labels": y})
    mode = _prepared(student, (x, y))
    with pytest.raises(ValueError, match="the student has 2 parameters, its EMA copy 4"):
        mode.end_step(torch.nn.Linear(12, 5))
    assert make_mode("consistency", weight=2.0).weight == 2.0


# -- through the Distiller -----------------------------------------------------------------


def _distiller(mode, student, **kw):
    kw.setdefault("progress", False)
    kw.setdefault("lr", 1e-2)
    return Distiller(student, mode, **kw)


def test_fit_lowers_the_loss_and_reports_agreement_with_the_ema():
    torch.manual_seed(0)
    student = Net(seed=2)
    d = _distiller(Consistency(weight=5.0, rampup_steps=20, noise_std=STD), student, epochs=6, log_every=1)
    assert len(d.parameters()) == 4 and all(a is b for a, b in zip(d.parameters(), student.parameters()))
    result = d.fit(loader(128, 16, unlabelled_every=2), eval_data=loader(64, 32, seed=1, shuffle=False))
    losses = [h["loss"] for h in result.history if "loss" in h]
    assert sum(losses[-8:]) / 8 < 0.8 * sum(losses[:8]) / 8
    assert "agreement" in result.metrics and int(d.mode.steps) == result.steps == 48
    assert all(p.grad is None for p in d.mode.ema.parameters())


def test_resume_gives_an_identical_continuation(tmp_path):
    x = torch.randn(60, 12, generator=torch.Generator().manual_seed(0))
    y = torch.arange(60) % 5
    y[::3] = -100

    def run(folder, callbacks=(), resume=None):
        torch.manual_seed(123)
        student = Net(seed=2)
        mode = Consistency(weight=3.0, rampup_steps=10, ema_decay=0.9, noise_std=STD)
        d = _distiller(mode, student, epochs=2, checkpoint_dir=folder, save_every=1, log_every=1,
                       callbacks=callbacks)
        d.fit(DataLoader(TensorDataset(x, y), batch_size=8, shuffle=True), resume=resume)
        return d

    straight, resumed = crash_and_resume(tmp_path, run, 6)
    assert straight.step == 16 and int(resumed.mode.steps) == 16
    assert_identical_runs(straight, resumed)
